package authz.gateway_test

import data.authz.gateway

# Keys are mocked by digest, exactly as authz presents them (input.credentials).
keys := {
	crypto.sha256("k-admin"): {"id": "key-admin", "enabled": true, "role": "admin", "rate_limit_tier": "premium"},
	crypto.sha256("k-user"): {"id": "key-user", "enabled": true, "role": "user", "rate_limit_tier": "standard"},
	crypto.sha256("k-viewer"): {"id": "key-viewer", "enabled": true, "role": "viewer", "rate_limit_tier": "default"},
	crypto.sha256("k-disabled"): {"id": "key-disabled", "enabled": false, "role": "admin", "rate_limit_tier": "default"},
	crypto.sha256("k-expired"): {
		"id": "key-expired", "enabled": true, "role": "admin", "rate_limit_tier": "default",
		"expires_at": "2020-01-01T00:00:00Z",
	},
	crypto.sha256("k-future"): {
		"id": "key-future", "enabled": true, "role": "user", "rate_limit_tier": "default",
		"expires_at": "2200-01-01T00:00:00Z",
	},
	crypto.sha256("k-bad-expiry"): {
		"id": "key-bad-expiry", "enabled": true, "role": "admin", "rate_limit_tier": "default",
		"expires_at": "next tuesday",
	},
	crypto.sha256("k-no-enabled"): {"id": "key-no-enabled", "role": "admin", "rate_limit_tier": "default"},
}

# An input as authz builds it: credential headers replaced, digests in input.credentials.
req(method, path, creds, extra_headers) := {
	"attributes": {"request": {"http": {
		"method": method,
		"path": path,
		"headers": object.union_n([
			{"host": "gateway", ":path": path},
			{name: masked(name, d) | some name, d in creds},
			extra_headers,
		]),
	}}},
	"parsed_path": split(trim_left(split(path, "?")[0], "/"), "/"),
	"parsed_query": {},
	"credentials": creds,
}

# authz keeps the scheme of an Authorization header and masks only the credential.
masked("authorization", d) := sprintf("Bearer sha256:%s", [d])

masked(name, d) := sprintf("sha256:%s", [d]) if name != "authorization"

api_key(k) := {"x-api-key": crypto.sha256(k)}

bearer(k) := {"authorization": crypto.sha256(k)}

decide(method, path, creds) := d if {
	d := gateway.decision with input as req(method, path, creds, {}) with data.gateway.api_keys as keys
}

# [name, method, path, credentials, expected status (200 = allowed), expected reason]
cases := [
	["no key", "GET", "/api/v1/status", {}, 401, "missing_api_key"],
	["unknown key", "GET", "/api/v1/status", api_key("nope"), 401, "invalid_api_key"],
	["disabled key", "GET", "/api/v1/status", api_key("k-disabled"), 401, "disabled_api_key"],
	["enabled missing", "GET", "/api/v1/status", api_key("k-no-enabled"), 401, "disabled_api_key"],
	["expired key", "GET", "/api/v1/status", api_key("k-expired"), 401, "expired_api_key"],
	["unparseable expiry", "GET", "/api/v1/status", api_key("k-bad-expiry"), 401, "expired_api_key"],
	["future expiry", "GET", "/api/v1/items", api_key("k-future"), 200, "allowed"],
	["viewer status", "GET", "/api/v1/status", api_key("k-viewer"), 200, "allowed"],
	["viewer head status", "HEAD", "/api/v1/status", api_key("k-viewer"), 200, "allowed"],
	["viewer reads", "GET", "/api/v1/items/42", api_key("k-viewer"), 200, "allowed"],
	["viewer cannot write", "POST", "/api/v1/items", api_key("k-viewer"), 403, "role_not_allowed"],
	["user writes", "POST", "/api/v1/items", api_key("k-user"), 200, "allowed"],
	["user deletes", "DELETE", "/api/v1/items/1", api_key("k-user"), 200, "allowed"],
	["user not admin", "GET", "/api/v1/admin/users", api_key("k-user"), 403, "role_not_allowed"],
	["user not admin root", "GET", "/api/v1/admin", api_key("k-user"), 403, "role_not_allowed"],
	["viewer not admin deep", "GET", "/api/v1/admin/a/b/c", api_key("k-viewer"), 403, "role_not_allowed"],
	["admin admin", "DELETE", "/api/v1/admin/users/7", api_key("k-admin"), 200, "allowed"],
	["admin admin root", "GET", "/api/v1/admin", api_key("k-admin"), 200, "allowed"],
	["bearer works", "GET", "/api/v1/status", bearer("k-user"), 200, "allowed"],
	["lowercase method", "get", "/api/v1/status", api_key("k-user"), 200, "allowed"],
	["query ignored", "GET", "/api/v1/status?x=/api/v1/admin", api_key("k-viewer"), 200, "allowed"],
	["unknown path", "GET", "/internal/metrics", api_key("k-admin"), 403, "path_not_allowed"],
	["unknown method", "TRACE", "/api/v1/items", api_key("k-admin"), 403, "path_not_allowed"],
	["dot segments", "GET", "/api/v1/status/../admin/users", api_key("k-user"), 400, "invalid_path"],
	["admin lookalike", "GET", "/api/v1/administrator", api_key("k-viewer"), 200, "allowed"],
]

test_cases if {
	every c in cases {
		d := decide(c[1], c[2], c[3])
		status := object.get(d, "http_status", 200)
		print(c[0], status, d.authz.reason) # shown with -v, and for the failing case
		status == c[4]
		d.authz.reason == c[5]
		expect_allowed := c[4] == 200
		d.allowed == expect_allowed
	}
}

test_x_api_key_wins_over_authorization if {
	d := decide("GET", "/api/v1/status", object.union(api_key("nope"), bearer("k-admin")))
	d.authz.reason == "invalid_api_key"
}

test_authorization_needs_bearer_scheme if {
	i := req("GET", "/api/v1/status", bearer("k-admin"), {"authorization": "Basic sha256:00"})
	d := gateway.decision with input as i with data.gateway.api_keys as keys
	d.authz.reason == "missing_api_key"
}

test_401_carries_challenge if {
	decide("GET", "/api/v1/status", {}).headers["www-authenticate"] == `Bearer realm="authz"`
	rejected := decide("GET", "/api/v1/status", api_key("nope"))
	rejected.headers["www-authenticate"] == `Bearer realm="authz", error="invalid_token"`
}

test_403_has_no_challenge if {
	d := decide("POST", "/api/v1/items", api_key("k-viewer"))
	not d.headers
}

test_allow_sets_identity_and_strips_key if {
	d := decide("GET", "/api/v1/status", api_key("k-user"))
	d.headers == {"x-authz-key-id": "key-user", "x-authz-role": "user", "x-authz-tier": "standard"}
	"x-api-key" in d.request_headers_to_remove
	"authorization" in d.request_headers_to_remove
	d.authz.rate_limit == {"tier": "standard", "key": "key:key-user", "requests_per_minute": 120}
	d.authz.identity.key_id == "key-user"
}

# One list of credentials (authz.core.headers): whatever authz hashed (input.credentials) is a
# credential the upstream must not get, not only the gateway's own two headers.
test_allow_strips_every_credential_authz_hashed if {
	hashed := {"api-key": "00", "x-goog-api-key": "00", "cookie": "00", "x-upstream-token": "00"}
	d := decide("GET", "/api/v1/items", object.union(api_key("k-user"), hashed))
	d.allowed
	every name, _ in hashed {
		name in d.request_headers_to_remove
	}
}

test_forged_identity_headers_removed_or_overwritten if {
	forged := {"x-authz-key-id": "key-admin", "x-authz-role": "admin", "x-authz-extra": "1"}
	d := gateway.decision with input as req("GET", "/api/v1/status", api_key("k-viewer"), forged)
		with data.gateway.api_keys as keys
	d.headers["x-authz-role"] == "viewer"
	"x-authz-extra" in d.request_headers_to_remove
	not "x-authz-role" in d.request_headers_to_remove
}

test_no_raw_key_in_decision if {
	d := decide("GET", "/api/v1/status", api_key("k-user"))
	not contains(json.marshal(d), crypto.sha256("k-user"))
}

# The shipped data must be well formed: digests as keys, known roles and tiers, valid times.
test_shipped_keys_well_formed if {
	every digest, k in object.get(data.gateway, "api_keys", {}) {
		regex.match(`^[0-9a-f]{64}$`, digest)
		is_string(k.id)
		is_boolean(k.enabled)
		k_ns := object.get(k, "namespace", "")
		object.get(k, "role", object.get(namespaces_data, [k_ns, "role"], null)) in data.gateway.roles
		k_tier := object.get(k, "rate_limit_tier", object.get(namespaces_data, [k_ns, "rate_limit_tier"], null))
		data.gateway.rate_limit_tiers[k_tier]
		valid_expiry(k)
	}
}

# A key's own field, else its namespace's default (builtins only: this runs per key, and
# bundles hold 100,000 keys).
effective(k, field) := object.get(k, field, object.get(namespaces_data, [object.get(k, "namespace", ""), field], null))

default namespaces_data := {}

namespaces_data := data.gateway.namespaces

test_shipped_namespaces_well_formed if {
	every ns in object.get(data.gateway, "namespaces", {}) {
		object.get(ns, "role", data.gateway.roles[0]) in data.gateway.roles
		data.gateway.rate_limit_tiers[object.get(ns, "rate_limit_tier", "default")]
	}
}

test_data_check_takes_role_and_tier_from_the_namespace if {
	own := {"role": "admin", "namespace": "labs/research"}
	effective(own, "role") == "admin" with data.gateway.namespaces as namespaces
	effective({"namespace": "labs/research"}, "role") == "viewer" with data.gateway.namespaces as namespaces
	effective({"namespace": "labs/research"}, "rate_limit_tier") == "standard" with data.gateway.namespaces as namespaces
	effective({"namespace": "labs/nowhere"}, "role") == null with data.gateway.namespaces as namespaces
	effective({}, "role") == null with data.gateway.namespaces as namespaces
}

valid_expiry(k) if not k.expires_at

valid_expiry(k) if is_number(time.parse_rfc3339_ns(k.expires_at))

test_shipped_path_rules_well_formed if {
	every rule in data.gateway.path_rules {
		startswith(rule.pattern, "/")
		count(rule.methods) > 0
		count(rule.roles) > 0
	}
}

# -- TTL overrides (data.overrides, pushed by authz) ---------------------------------------

future_ns := time.now_ns() + 3600000000000

past_ns := time.now_ns() - 1

ovr(id, effect, match, expires_ns) := {
	"id": id,
	"effect": effect,
	"decision_path": "authz/gateway/decision",
	"match": match,
	"reason": concat(" ", ["test", id]),
	"expires_at_ns": expires_ns,
}

decide_with(method, path, creds, overrides) := d if {
	d := gateway.decision with input as req(method, path, creds, {})
		with data.gateway.api_keys as keys
		with data.overrides as overrides
}

test_allow_override_grants_an_exception if {
	o := {"o1": ovr("o1", "allow", {"key_id": "key-user", "path": "/api/v1/admin/**", "methods": ["GET"]}, future_ns)}
	d := decide_with("GET", "/api/v1/admin/reports", api_key("k-user"), o)
	d.allowed
	d.authz.reason == "allowed_by_override"
	d.authz.override == {"id": "o1", "reason": "test o1"}
	d.headers["x-authz-key-id"] == "key-user"
	"x-api-key" in d.request_headers_to_remove
}

test_allow_override_is_scoped if {
	o := {"o1": ovr("o1", "allow", {"key_id": "key-user", "path": "/api/v1/admin/**", "methods": ["GET"]}, future_ns)}
	decide_with("DELETE", "/api/v1/admin/reports", api_key("k-user"), o).authz.reason == "role_not_allowed"
	decide_with("GET", "/internal/x", api_key("k-user"), o).authz.reason == "path_not_allowed"
	decide_with("GET", "/api/v1/admin/reports", api_key("k-viewer"), o).authz.reason == "role_not_allowed"
}

test_expired_override_is_ignored if {
	o := {"o1": ovr("o1", "allow", {"key_id": "key-user"}, past_ns)}
	decide_with("GET", "/api/v1/admin/reports", api_key("k-user"), o).authz.reason == "role_not_allowed"
}

test_override_for_another_decision_path_is_ignored if {
	egress_allow := ovr("o1", "allow", {"key_id": "key-user"}, future_ns)
	o := {"o1": object.union(egress_allow, {"decision_path": "authz/egress/decision"})}
	decide_with("GET", "/api/v1/admin/reports", api_key("k-user"), o).authz.reason == "role_not_allowed"
}

test_override_never_bypasses_authentication if {
	o := {"o1": ovr("o1", "allow", {"key_id": "key-disabled"}, future_ns)}
	decide_with("GET", "/api/v1/status", api_key("k-disabled"), o).authz.reason == "disabled_api_key"
	decide_with("GET", "/api/v1/status", api_key("nope"), o).authz.reason == "invalid_api_key"
}

test_deny_override_blocks_and_wins if {
	o := {
		"a": ovr("a", "allow", {"key_id": "key-admin"}, future_ns),
		"b": ovr("b", "deny", {"key_id": "key-admin"}, future_ns),
	}
	d := decide_with("GET", "/api/v1/status", api_key("k-admin"), o)
	not d.allowed
	d.http_status == 403
	d.authz.reason == "blocked_by_override"
	d.authz.override.id == "b"
}

test_denies_about_a_known_key_name_it if {
	decide("POST", "/api/v1/items", api_key("k-viewer")).authz.identity.key_id == "key-viewer"
	decide("GET", "/api/v1/status", api_key("k-expired")).authz.identity.key_id == "key-expired"
	not decide("GET", "/api/v1/status", api_key("nope")).authz.identity
	not decide("GET", "/api/v1/status", {}).authz.identity
}

test_expiring_key_bounds_the_cache if {
	d := decide("GET", "/api/v1/items", api_key("k-future"))
	d.authz.cache_ttl_s > 0
	not decide("GET", "/api/v1/items", api_key("k-user")).authz.cache_ttl_s
}

test_override_bounds_the_cache if {
	o := {"o1": ovr("o1", "allow", {"key_id": "key-user"}, future_ns)}
	d := decide_with("GET", "/api/v1/admin/reports", api_key("k-user"), o)
	d.authz.cache_ttl_s <= 3600
	d.authz.cache_ttl_s > 3590
}

# -- path parameters and case (security review) ------------------------------------------

# /api/v1/admin/** is admin-only. A ';' path parameter makes the segment "admin;x", so no
# admin rule matches and /api/v1/** lets a user (or viewer) through. Envoy forwards the
# path unchanged (normalize_path leaves ';' alone); servlet containers and Spring strip
# ';...' from each segment and serve /api/v1/admin/users.
test_path_parameters_do_not_escape_the_admin_rule if {
	d := decide("GET", "/api/v1/admin;x/users", api_key("k-user"))
	not d.allowed
}

test_path_parameter_on_the_last_admin_segment if {
	d := decide("DELETE", "/api/v1/admin;/users/7", api_key("k-user"))
	not d.allowed
}

test_path_case_cannot_escape_the_admin_rule if {
	d := decide("GET", "/api/v1/Admin/users", api_key("k-user"))
	d.authz.reason == "role_not_allowed"
}

# /api/v1/admin.json, /api/v1/admin%20/x and /api/v1/admin./x were allowed for a viewer
# through /api/v1/**: upstreams read a format suffix (Rails, Spring), trim whitespace and
# trailing dots (Windows, IIS) and serve the admin resource. A path rule matches a segment
# as written or normalized (lib.normalized_path); paths are percent-decoded here, as in
# input.parsed_path. (issue #13, finding 10)
admin_spellings := [
	"/api/v1/admin.json",
	"/api/v1/admin.json/users",
	"/api/v1/admin /x",
	"/api/v1/admin\t/x",
	"/api/v1/admin\u00a0/x",
	"/api/v1/admin\u0000/x",
	"/api/v1/admin./x",
	"/api/v1/admin. ./x",
	"/api/v1/ admin/x",
	"/api/v1/ADMIN.Json",
	"/api/v1/admin..",
]

test_every_spelling_of_admin_is_the_admin_rule if {
	every path in admin_spellings {
		d := decide("GET", path, api_key("k-viewer"))
		print(path, d.authz.reason) # shown for the failing case
		d.authz.reason == "role_not_allowed"
		decide("GET", path, api_key("k-admin")).allowed
	}
}

# A segment of only dots, whitespace or control characters is refused: an upstream that
# trims it may find a dot segment (".. " -> "..") or an empty one, and resolve the path to
# another resource than the one matched.
test_segments_of_dots_and_whitespace_are_invalid if {
	paths := ["/api/v1/x/.. /admin/users", "/api/v1/x/. /admin", "/api/v1/x/.../admin", "/api/v1/ /x", "/api/v1/x/\t"]
	every path in paths {
		d := decide("GET", path, api_key("k-viewer"))
		print(path, d.authz.reason) # shown for the failing case
		d.authz.reason == "invalid_path"
	}
}

test_normalized_matching_keeps_ordinary_paths if {
	every path in ["/api/v1/items/7.json", "/api/v1/items/a.b.c", "/api/v1/.well-known/x", "/api/v1/administrators"] {
		decide("GET", path, api_key("k-viewer")).allowed
	}
	decide("GET", "/api/v1/status.json", api_key("k-viewer")).allowed
}

# A deny override on the admin paths blocks every spelling of them too.
test_deny_override_covers_every_spelling if {
	o := {"o1": ovr("o1", "deny", {"key_id": "key-admin", "path": "/api/v1/admin/**"}, future_ns)}
	every path in ["/api/v1/admin/x", "/api/v1/admin./x", "/api/v1/admin.json/x", "/api/v1/admin /x"] {
		decide_with("GET", path, api_key("k-admin"), o).authz.reason == "blocked_by_override"
	}
}

test_override_naming_an_unknown_key_is_a_bundle_warning if {
	o := {
		"o1": ovr("o1", "allow", {"key_id": "key-gone"}, future_ns),
		"o2": ovr("o2", "deny", {"key_id": "key-user"}, future_ns),
	}
	w := data.authz.meta.warnings with data.gateway.api_keys as keys with data.overrides as o
	w == {`override "o1" names api key "key-gone", which data.gateway.api_keys does not define`}
}

# Namespaces: a key inherits its namespace's role and tier unless its own entry sets them.
ns_keys := {
	crypto.sha256("k-ns"): {"id": "key-ns", "enabled": true, "namespace": "labs/research"},
	crypto.sha256("k-ns-own"): {
		"id": "key-ns-own", "enabled": true, "namespace": "labs/research",
		"role": "admin", "rate_limit_tier": "premium",
	},
	crypto.sha256("k-ns-tier"): {"id": "key-ns-tier", "enabled": true, "namespace": "labs/research", "role": "user"},
	crypto.sha256("k-ns-unknown"): {"id": "key-ns-unknown", "enabled": true, "namespace": "labs/nowhere"},
	crypto.sha256("k-exp"): {
		"id": "key-exp", "enabled": true, "role": "user", "rate_limit_tier": "default",
		"expires_at": "2200-01-01T00:00:00Z",
	},
}

namespaces := {"labs/research": {"role": "viewer", "rate_limit_tier": "standard"}}

ns_decide(method, path, k) := d if {
	d := gateway.decision with input as req(method, path, api_key(k), {})
		with data.gateway.api_keys as ns_keys
		with data.gateway.namespaces as namespaces
}

test_namespace_defaults_apply if {
	d := ns_decide("GET", "/api/v1/items", "k-ns")
	d.allowed
	d.authz.source == "namespace_default"
	d.authz.identity == {"key_id": "key-ns", "role": "viewer", "tier": "standard", "namespace": "labs/research"}
	d.headers["x-authz-role"] == "viewer"
	d.authz.rate_limit.tier == "standard"
	d.authz.rate_limit.requests_per_minute == 120
}

test_namespace_default_role_still_limits_paths if {
	d := ns_decide("POST", "/api/v1/items", "k-ns")
	not d.allowed
	d.authz.reason == "role_not_allowed"
	d.authz.source == "deny"
}

test_key_own_rule_wins_over_namespace if {
	d := ns_decide("GET", "/api/v1/admin/users", "k-ns-own")
	d.allowed
	d.authz.source == "policy_rule"
	d.authz.identity.role == "admin"
	d.authz.rate_limit.tier == "premium"
}

test_key_own_role_namespace_tier if {
	d := ns_decide("POST", "/api/v1/items", "k-ns-tier")
	d.allowed
	d.authz.source == "namespace_default"
	d.authz.identity.role == "user"
	d.authz.rate_limit.tier == "standard"
}

test_unknown_namespace_without_own_role_is_denied if {
	d := ns_decide("GET", "/api/v1/items", "k-ns-unknown")
	not d.allowed
	d.http_status == 403
}

test_identity_carries_expiry if {
	d := ns_decide("GET", "/api/v1/items", "k-exp")
	d.authz.source == "policy_rule"
	d.authz.identity.expires_at == "2200-01-01T00:00:00Z"
	not d.authz.identity.namespace
}

test_source_of_override_decisions if {
	allow := {"o1": ovr("o1", "allow", {"key_id": "key-viewer"}, future_ns)}
	decide_with("POST", "/api/v1/items", api_key("k-viewer"), allow).authz.source == "override"
	block := {"o2": ovr("o2", "deny", {"key_id": "key-viewer"}, future_ns)}
	decide_with("GET", "/api/v1/items", api_key("k-viewer"), block).authz.source == "override"
	decide("GET", "/api/v1/items", api_key("k-viewer")).authz.source == "policy_rule"
	decide("GET", "/api/v1/items", {}).authz.source == "deny"
}

test_unknown_namespace_is_a_bundle_warning if {
	w := data.authz.meta.warnings with data.gateway.api_keys as ns_keys with data.gateway.namespaces as namespaces
	w == {`api key "key-ns-unknown" names namespace "labs/nowhere", which data.gateway.namespaces does not define`}
}

# -- authz's admin preview (input.preview) ---------------------------------------------------

preview_req(method, path, key_id) := object.union(req(method, path, {}, {}), {"preview": {"key_id": key_id}})

test_preview_finds_the_key_by_id if {
	i := preview_req("GET", "/api/v1/admin/users", "key-admin")
	d := gateway.decision with input as i with data.gateway.api_keys as keys
	d.allowed
	d.authz.identity.key_id == "key-admin"
	d.authz.source == "policy_rule"
	gateway.decision.authz.reason == "role_not_allowed" with input as preview_req("GET", "/api/v1/admin/users", "key-user")
		with data.gateway.api_keys as keys
	gateway.decision.authz.reason == "invalid_api_key" with input as preview_req("GET", "/api/v1/status", "key-nope")
		with data.gateway.api_keys as keys
	gateway.decision.authz.reason == "disabled_api_key" with input as preview_req("GET", "/api/v1/status", "key-disabled")
		with data.gateway.api_keys as keys
}

test_presented_key_wins_over_preview if {
	i := object.union(req("GET", "/api/v1/admin/users", api_key("k-viewer"), {}), {"preview": {"key_id": "key-admin"}})
	d := gateway.decision with input as i with data.gateway.api_keys as keys
	d.authz.identity.key_id == "key-viewer"
	not d.allowed
}
