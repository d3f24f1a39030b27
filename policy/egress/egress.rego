# Egress policy: which sandbox may call which external service, with which method and path.
#
# Query: data.authz.egress.decision (egress routes set decision_path authz/egress/decision
# and service=<name> in context_extensions). Data: data.egress.services (the services
# config, also the source of the egress Envoy config), data.egress.tiers,
# data.egress.sandboxes (keyed by sandbox id; tokens only as SHA-256 digests),
# data.egress.identity (header names; mode "token", or "header" for trusted networks),
# data.egress.namespaces (defaults for the sandboxes of a namespace, e.g. "labs/agents").
#
# On allow the decision names the credential to inject by reference (the service name);
# authz resolves it from its secrets file. OPA never sees a credential value.
package authz.egress

import data.authz.lib

identity := data.egress.identity

headers := input.attributes.request.http.headers

method := upper(input.attributes.request.http.method)

# Everything in the input this policy reads, for authz's decision cache (docs/contract.md,
# "Declared cache keys"): requests equal in these share one cached decision, whatever
# else differs. Keep it in step with every input.* below and in lib; a test
# (tests/integration/test_declared_cache_keys.py) proves it against this policy.
cache_key := {
	"input": [
		["credentials"],
		["preview"],
		["parsed_path"],
		["attributes", "contextExtensions", "service"],
		["attributes", "request", "http", "method"],
		["attributes", "request", "http", "host"],
		["attributes", "request", "http", "headers", identity.id_header],
	],
	# headers_to_remove: the names of client-sent x-sandbox-* and x-authz-* headers.
	"header_prefixes": ["x-sandbox-", "x-authz-"],
}

# The service is the one the Envoy route forwards to; the Host header only when a route
# does not say (e.g. a policy reused behind another proxy).
service_name := input.attributes.contextExtensions.service if {
	input.attributes.contextExtensions.service != ""
} else := split(input.attributes.request.http.host, ":")[0] if {
	not input.attributes.contextExtensions.service
}

service := data.egress.services[service_name]

# authz's admin preview (POST /v1/preview) names the sandbox, whose identity then counts
# as proven (no token). Only authz's preview sets input.preview; an input built from an
# Envoy CheckRequest never has it.
sandbox_id := input.preview.sandbox_id if {
	# Not redundant: a false sandbox_id falls through to the header.
	# regal ignore:redundant-existence-check
	input.preview.sandbox_id
} else := headers[identity.id_header]

sandbox := data.egress.sandboxes[sandbox_id]

token_digest := input.credentials[identity.token_header]

header_only if identity.mode == "header"

previewed if input.preview.sandbox_id == sandbox_id

token_ok if header_only

token_ok if previewed

token_ok if token_digest == sandbox.token_sha256

enabled if sandbox.enabled == true

# A sandbox may belong to a namespace whose default tier applies unless the sandbox's own
# entry names one.
namespace_defaults := data.egress.namespaces[sandbox.namespace]

sandbox_tier := sandbox.tier

sandbox_tier := namespace_defaults.tier if not sandbox.tier

tier := data.egress.tiers[sandbox_tier]

# Where the allow came from (the decision's "authz.source", shown by authz's preview API).
default allow_source := "policy_rule"

allow_source := "namespace_default" if not sandbox.tier

service_in_tier if "*" in tier.services

service_in_tier if service_name in tier.services

method_allowed if method in service.allowed_methods

# A service may narrow the paths of some methods (paths_by_method, e.g. GitHub's short
# write set); the others use allowed_paths. Paths granted match exactly as written.
method_paths := service.paths_by_method[method]

method_paths := service.allowed_paths if not service.paths_by_method[method]

path_allowed if {
	some pattern in method_paths
	lib.match_path(pattern)
}

# What a service never allows, whatever the tier or an override says (denied_paths:
# [{methods, paths}], "*" for every method). Matched under every spelling of the path.
path_denied if {
	some rule in service.denied_paths
	some allowed_method in rule.methods
	allowed_method in {"*", method}
	some pattern in rule.paths
	lib.match_path_any_spelling(pattern)
}

overrides := lib.overrides_for("authz/egress/decision", "sandbox_id", sandbox_id)

# A deny override may name a service (then it blocks that service only) or not (every
# service). An allow override opens the one service it names: one without (authz's admin
# API refuses it) opens nothing.
service_overrides contains o if {
	some o in overrides
	object.get(o.match, "service", service_name) == service_name
}

blocked := lib.first_override(service_overrides, "deny")

excepted := lib.first_override({o | some o in overrides; o.match.service == service_name}, "allow")

authorized if {
	service_in_tier
	method_allowed
	path_allowed
	not path_denied
}

# Every decision about a known sandbox names it (the decision log's sandbox_id), denies
# included; the tier only once the token has proven the sandbox.
# METADATA
# entrypoint: true
decision := object.union_n([verdict, {"authz": {"identity": decision_identity}}, cache_hint]) if {
	sandbox
} else := verdict

# A decision that changes when an override expires says how long it holds (authz's
# decision cache).
default cache_hint := {}

cache_hint := {"authz": {"cache_ttl_s": max([0, min(ttls)])}} if {
	ttls := [ttl | some o in overrides; ttl := (o.expires_at_ns - time.now_ns()) / 1000000000]
	count(ttls) > 0
}

decision_identity := object.union(
	{"sandbox_id": sandbox_id, "service": service_name, "tier": sandbox_tier},
	{"namespace": sandbox.namespace | is_string(sandbox.namespace)},
) if {
	token_ok
} else := {"sandbox_id": sandbox_id, "service": service_name}

# One ordered chain: the first failing check names the deny, so it reads top to bottom.
# regal ignore:rule-length
verdict := lib.unauthorized("missing_sandbox_id", false) if {
	not sandbox_id
} else := lib.unauthorized("unknown_sandbox", true) if {
	not sandbox
} else := lib.unauthorized("missing_sandbox_token", false) if {
	not header_only
	not previewed
	not token_digest
} else := lib.unauthorized("invalid_sandbox_token", true) if {
	not token_ok
} else := lib.unauthorized("sandbox_disabled", true) if {
	not enabled
} else := lib.deny(403, "unknown_service") if {
	not service
} else := lib.blocked_by(blocked) if {
	blocked
} else := lib.deny(400, "invalid_path") if {
	lib.bad_path
} else := lib.allowed_by(allow, excepted) if {
	not authorized
	not path_denied
	excepted
} else := lib.deny(403, "service_not_allowed") if {
	not service_in_tier
} else := lib.deny(403, "method_not_allowed") if {
	not method_allowed
} else := lib.deny(403, "path_denied") if {
	path_denied
} else := lib.deny(403, "path_not_allowed") if {
	not path_allowed
} else := allow

# Sandbox identity, any x-sandbox-*/x-authz-* header, every credential a sandbox might
# send (data.egress.strip_headers lists authz.core.headers' credential and forwarding headers,
# a unit test keeps them equal; input.credentials names every header authz hashed, which
# AUTHZ_CREDENTIAL_HEADERS may extend), and client-sent forwarding and method-override
# headers: the upstream gets only the credential authz injects, and learns neither the
# sandbox's address nor a method other than the one checked here.
headers_to_remove contains name if some name in data.egress.strip_headers

headers_to_remove contains name if some name, _ in input.credentials

headers_to_remove contains identity.id_header

headers_to_remove contains identity.token_header

headers_to_remove contains name if {
	some name, _ in headers
	some prefix in ["x-sandbox-", "x-authz-"]
	startswith(name, prefix)
}

allow := object.union(
	{
		"allowed": true,
		# authz's own fields (docs/contract.md), apart from the plugin's.
		"authz": {
			"reason": "allowed",
			"source": allow_source,
			"rate_limit": {
				"tier": sandbox_tier,
				"key": concat(":", ["sandbox", sandbox_id, service_name]),
				"requests_per_minute": requests_per_minute,
			},
			"identity": decision_identity,
		},
		"request_headers_to_remove": sort(headers_to_remove),
		"dynamic_metadata": {"sandbox_id": sandbox_id, "service": service_name, "tier": sandbox_tier},
	},
	credential,
)

# A tier that grants no service has no rate to speak of (0 per minute); a call an override
# lets through uses data.egress.override_rate_limit instead, or it would always be a 429.
default requests_per_minute := 0

requests_per_minute := tier.rate_limit.requests_per_minute if {
	tier.rate_limit.requests_per_minute != 0
} else := data.egress.override_rate_limit.requests_per_minute if {
	excepted
}

# By reference only: the secrets file entry named after the service.
default credential := {}

credential := {"authz": {"credential": {
	"ref": service_name,
	"header": service.credential.header,
	"format": service.credential.format,
}}} if {
	service.credential
}
