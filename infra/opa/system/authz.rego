# OPA's own REST API authorization (opa run --authentication=token --authorization=basic).
# OPA evaluates data.system.authz.allow for every API request; input.identity is the
# bearer token the client sent, input.method/input.path (split on "/") what it asked for.
# See https://www.openpolicyagent.org/docs/security#authentication-and-authorization
#
# Allowed, and nothing else:
#   - anyone: GET /health (probes, authz's readiness) and GET /metrics (Prometheus)
#   - authz (its token, AUTHZ_OPA_TOKEN in OPA's environment): POST the decision paths
#     authz queries (and their batch rule), and read/write TTL overrides under /v1/data/overrides (a root no
#     bundle owns)
# Denied, e.g.: GET /v1/data (would dump API key digests and policy data), /v1/policies,
# /v1/query, /v1/compile, /v1/config, /v1/status, PUT/PATCH/DELETE outside overrides.
package system.authz

# METADATA
# entrypoint: true
default allow := false

allow if {
	input.method == "GET"
	input.path in {["health"], ["metrics"]}
}

allow if {
	caller_is_authz
	input.method == "POST"
	input.path in decision_paths
}

allow if {
	caller_is_authz
	input.method in {"GET", "PUT", "DELETE"}
	array.slice(input.path, 0, 3) == ["v1", "data", "overrides"]
}

# The data API paths authz POSTs (with ?provenance): the two decision paths its Envoy
# routes name (context_extensions decision_path), the batch rule that decides many
# inputs of those paths in one query (README "Batch queries and BatchCheck"), the
# constant it probes every second for the active bundle revision, and the policy
# warnings it logs at each bundle activation. A route with another decision_path needs
# its path added here (and to the batch rule, authz generate batch-rule).
decision_paths := {
	["v1", "data", "authz", "gateway", "decision"],
	["v1", "data", "authz", "egress", "decision"],
	["v1", "data", "authz", "batch", "result"],
	["v1", "data", "authz", "meta", "live"],
	["v1", "data", "authz", "meta", "warnings"],
}

# The token comes from OPA's environment (never from a file in the repository). A short
# or unset token authorizes nobody.
caller_is_authz if {
	token := object.get(opa.runtime().env, "AUTHZ_OPA_TOKEN", "")
	count(token) >= 32
	input.identity == token
}
