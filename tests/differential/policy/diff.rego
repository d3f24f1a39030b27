# The differential test's policy, served by the same bundle to opa-envoy-plugin and to
# authz (tests/integration/test_differential.py).
#
# - A request without `x-diff-case` is a request-corpus case: the decision allows it and
#   echoes the input document it was given in `dynamic_metadata`: `diff_input` is
#   json.marshal(input); `diff_raw` maps the JSON-encoded path of every string in the
#   input to base64 of its bytes (json.marshal cannot show raw, non-UTF-8 bytes).
# - A request with `x-diff-case: <id>` is a decision-corpus case: the decision is
#   data.diffcases[<id>] (tests/differential/corpus/decisions.json), returned unchanged.
package diff

import rego.v1

case_id := input.attributes.request.http.headers["x-diff-case"]

main := data.diffcases[case_id]

main := echo if not case_id

echo := {"allowed": true, "dynamic_metadata": {
	"diff_input": json.marshal(input),
	"diff_raw": {json.marshal(path): base64.encode(value) |
		walk(input, [path, value])
		is_string(value)
	},
}}
