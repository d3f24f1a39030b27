# Gateway policy: API-key authentication, role/path rules, rate-limit tier.
#
# Query: data.authz.gateway.decision (the gateway route's decision_path is
# authz/gateway/decision). Data: data.gateway.api_keys (keyed by the SHA-256 digest of the
# key, never the key), data.gateway.path_rules, data.gateway.rate_limit_tiers,
# data.gateway.namespaces (defaults for the keys of a namespace, e.g. "labs/research").
#
# authz replaces credential headers by digests before OPA sees them (docs/contract.md):
# input.credentials["x-api-key"] / input.credentials.authorization hold the hex digests.
package authz.gateway

import data.authz.lib

identity_prefix := "x-authz-"

# Everything in the input this policy reads, for authz's decision cache (docs/contract.md,
# "Declared cache keys"): requests equal in these share one cached decision, whatever
# else differs (request ids, user agents, trace headers, the query string). Keep it in
# step with every input.* below and in lib; a test
# (tests/integration/test_declared_cache_keys.py) proves it against this policy.
cache_key := {
	"input": [
		["credentials"],
		["preview"],
		["parsed_path"],
		["attributes", "request", "http", "method"],
		["attributes", "request", "http", "headers", "authorization"],
	],
	# forged_identity_headers: the names of client-sent x-authz-* headers.
	"header_prefixes": [identity_prefix],
}

# authz itself sets x-authz-decision-id on allowed requests.
identity_headers := {"x-authz-key-id", "x-authz-role", "x-authz-tier", "x-authz-decision-id"}

headers := input.attributes.request.http.headers

method := upper(input.attributes.request.http.method)

# The presented key's digest: X-API-Key wins; else Authorization with the Bearer scheme.
key_digest := input.credentials["x-api-key"]

key_digest := input.credentials.authorization if {
	not input.credentials["x-api-key"]
	startswith(lower(headers.authorization), "bearer ")
}

# authz's admin preview (POST /v1/preview) asks what a key would be allowed: the admin
# names the key by id and the identity counts as proven. Only authz's preview sets
# input.preview; an input built from an Envoy CheckRequest never has it.
key_digest := preview_digest if {
	not input.credentials["x-api-key"]
	not input.credentials.authorization
	input.preview.key_id
}

# An id no key has: a digest no key has either (the preview then says invalid_api_key).
default preview_digest := ""

preview_digest := digest if {
	some digest, entry in data.gateway.api_keys
	entry.id == input.preview.key_id
}

key := data.gateway.api_keys[key_digest]

# A key may belong to a namespace; the namespace's defaults (role, rate_limit_tier) apply
# unless the key's own entry sets them.
namespace_defaults := data.gateway.namespaces[key.namespace]

role := key.role

role := namespace_defaults.role if not key.role

tier := key.rate_limit_tier

tier := namespace_defaults.rate_limit_tier if not key.rate_limit_tier

# Where the allow came from (the decision's "authz.source", shown by authz's preview API):
# the key's own entry, or its namespace's defaults for role or tier.
from_namespace if not key.role

from_namespace if not key.rate_limit_tier

default allow_source := "policy_rule"

allow_source := "namespace_default" if from_namespace

enabled if key.enabled == true

# A key with an expires_at that does not parse is treated as expired (fail closed).
expired if time.now_ns() >= time.parse_rfc3339_ns(key.expires_at)

expired if {
	key.expires_at
	not time.parse_rfc3339_ns(key.expires_at)
}

# Path rules are ordered, like firewall rules: the first rule whose pattern and methods
# match the request governs it, so a specific rule (/api/v1/admin/**) placed before a
# general one (/api/v1/**) restricts it. A rule matches the path as written or as an
# upstream may read it (lib.normalized_path): /api/v1/admin.json, /api/v1/admin./x and
# /api/v1/admin%20/x are the admin rule's.
matching_rules := [rule |
	some rule in data.gateway.path_rules
	lib.match_path_any_spelling(rule.pattern)
	method_matches(rule.methods)
]

method_matches(methods) if "*" in methods

method_matches(methods) if method in methods

role_allowed if role_matches(matching_rules[0].roles)

overrides := lib.overrides_for("authz/gateway/decision", "key_id", key.id)

blocked := lib.first_override(overrides, "deny")

excepted := lib.first_override(overrides, "allow")

role_matches(roles) if "*" in roles

role_matches(roles) if role in roles

# Every decision about a known key names it (the decision log's key_id), denies included.
# METADATA
# entrypoint: true
decision := object.union_n([verdict, {"authz": {"identity": decision_identity}}, cache_hint]) if {
	key.id
} else := verdict

# authz may reuse a decision for identical requests (its decision cache); a decision that
# changes when the key or an override expires says how long it holds.
default cache_hint := {}

cache_hint := {"authz": {"cache_ttl_s": max([0, min(ttls)])}} if {
	ttls := [ttl | some ns in expiries; ttl := (ns - time.now_ns()) / 1000000000]
	count(ttls) > 0
}

expiries contains time.parse_rfc3339_ns(key.expires_at) if key.expires_at

expiries contains o.expires_at_ns if some o in overrides

decision_identity := object.union(
	{"key_id": key.id, "role": role, "tier": tier},
	{name: value | some name in {"namespace", "expires_at"}; value := key[name]; is_string(value)},
)

verdict := lib.unauthorized("missing_api_key", false) if {
	not key_digest
} else := lib.unauthorized("invalid_api_key", true) if {
	not key
} else := lib.unauthorized("disabled_api_key", true) if {
	not enabled
} else := lib.unauthorized("expired_api_key", true) if {
	expired
} else := lib.blocked_by(blocked) if {
	blocked
} else := lib.deny(400, "invalid_path") if {
	lib.bad_path
} else := lib.allowed_by(allow, excepted) if {
	not role_allowed
	excepted
} else := lib.deny(403, "path_not_allowed") if {
	count(matching_rules) == 0
} else := lib.deny(403, "role_not_allowed") if {
	not role_allowed
} else := allow

headers_to_remove contains name if some name in ["x-api-key", "authorization"]

headers_to_remove contains name if some name, _ in input.credentials

headers_to_remove contains name if some name in lib.forged_identity_headers(identity_prefix, identity_headers)

allow := {
	"allowed": true,
	# authz's own fields (docs/contract.md), apart from the plugin's.
	"authz": {
		"reason": "allowed",
		"source": allow_source,
		"rate_limit": {
			"tier": tier,
			"key": concat(":", ["key", key.id]),
			"requests_per_minute": data.gateway.rate_limit_tiers[tier].requests_per_minute,
		},
		"identity": decision_identity,
	},
	# Set for the upstream; authz overwrites any client-sent header of the same name.
	"headers": {
		"x-authz-key-id": key.id,
		"x-authz-role": role,
		"x-authz-tier": tier,
	},
	# The key never reaches the upstream, nor does any other credential authz hashed
	# (input.credentials: authz.core.headers' list plus AUTHZ_CREDENTIAL_HEADERS), nor forged
	# identity headers. Forwarding headers are Envoy's (use_remote_address, route config).
	"request_headers_to_remove": sort(headers_to_remove),
	"dynamic_metadata": {"key_id": key.id, "role": role, "tier": tier},
}
