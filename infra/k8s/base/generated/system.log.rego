# GENERATED copy of infra/opa/system/log.rego by `python -m authz.tools.deploy` (kustomize reads only files under its kustomization's directory): do not edit.
# Decision log masking (OPA evaluates data.system.log.mask for every decision log entry
# before it is written). authz already replaces credentials with SHA-256 digests before
# OPA sees them (docs/contract.md); request bodies (LLM prompts, uploads) and cookies
# are dropped from OPA's decision log as well.
# See https://www.openpolicyagent.org/docs/management-decision-logs#masking-sensitive-data
package system.log

# METADATA
# entrypoint: true
mask contains "/input/attributes/request/http/body"

mask contains "/input/attributes/request/http/rawBody"

mask contains "/input/parsed_body"

mask contains "/input/attributes/request/http/headers/cookie"

# A bearer JWT in authorization reaches the policy in clear (docs/contract.md: io.jwt.*
# needs it); every other credential is a SHA-256 digest. Neither is logged: the header
# always, and Envoy's raw header list whenever it holds an authorization entry.
mask contains "/input/attributes/request/http/headers/authorization"

mask contains "/input/attributes/request/http/headerMap" if {
	some entry in input.input.attributes.request.http.headerMap.headers
	lower(entry.key) == "authorization"
}

# Query strings may carry credentials (?api_key=...): the request path (and its :path
# header) are dropped whenever they hold a query, and so are the credential-carrying
# parameters authz masks in its own audit trail (authz/runtime/logs.py SENSITIVE_QUERY_PARAMS).
mask contains "/input/attributes/request/http/path" if contains(input.input.attributes.request.http.path, "?")

mask contains "/input/attributes/request/http/headers/:path" if {
	contains(input.input.attributes.request.http.headers[":path"], "?")
}

mask contains concat("/", ["/input/parsed_query", name]) if {
	some name, _ in input.input.parsed_query
	lower(name) in sensitive_query_params
}

sensitive_query_params := {
	"api_key", "apikey", "api-key", "key", "token", "access_token", "id_token",
	"refresh_token", "client_secret", "secret", "password", "sig", "signature",
	"x-api-key", "code",
}
