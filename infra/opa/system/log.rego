# Decision log masking (OPA evaluates data.system.log.mask for every decision log entry
# before it is written). authz already replaces credentials with SHA-256 digests before
# OPA sees them (docs/contract.md); request bodies (LLM prompts, uploads) and cookies
# are dropped from OPA's decision log as well.
# See https://www.openpolicyagent.org/docs/management-decision-logs#masking-sensitive-data
package system.log

# A decision's input document is at /input. A batch query (data.authz.batch.result,
# README "Batch queries and BatchCheck") carries many, at /input/inputs/<i>: each is
# masked exactly as a single decision's input.
# METADATA
# entrypoint: true
mask contains concat("", ["/input", pointer]) if some pointer in always

mask contains concat("", ["/input", pointer]) if some pointer in depending(input.input)

mask contains concat("", ["/input/inputs/", format_int(i, 10), pointer]) if {
	some i, document in input.input.inputs
	some pointer in (always | depending(document))
}

# What one input document must not show in the log, as JSON pointers into it: always
# these, and what depends on its content.
always := {
	"/attributes/request/http/body",
	"/attributes/request/http/rawBody",
	"/parsed_body",
	"/attributes/request/http/headers/cookie",
	# A bearer JWT in authorization reaches the policy in clear (docs/contract.md:
	# io.jwt.* needs it); every other credential is a SHA-256 digest. Neither is logged:
	# the header always, and Envoy's raw header list whenever it holds an authorization
	# entry.
	"/attributes/request/http/headers/authorization",
}

depending(document) := header_map(document) | query(document)

header_map(document) := {"/attributes/request/http/headerMap"} if {
	some entry in document.attributes.request.http.headerMap.headers
	lower(entry.key) == "authorization"
} else := set()

# Query strings may carry credentials (?api_key=...): the request path (and its :path
# header) are dropped whenever they hold a query, and so are the credential-carrying
# parameters authz masks in its own audit trail (authz/runtime/logs.py SENSITIVE_QUERY_PARAMS).
query(document) := (path_masks | header_masks) | param_masks if {
	request := object.get(document, ["attributes", "request", "http"], {})
	path_masks := {"/attributes/request/http/path" | contains(object.get(request, "path", ""), "?")}
	header_masks := {"/attributes/request/http/headers/:path" |
		contains(object.get(request, ["headers", ":path"], ""), "?")
	}
	param_masks := {concat("/", ["/parsed_query", name]) |
		some name, _ in object.get(document, "parsed_query", {})
		lower(name) in sensitive_query_params
	}
}

sensitive_query_params := {
	"api_key", "apikey", "api-key", "key", "token", "access_token", "id_token",
	"refresh_token", "client_secret", "secret", "password", "sig", "signature",
	"x-api-key", "code",
}
