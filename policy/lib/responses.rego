# Decision building blocks shared by the gateway and egress policies.
#
# Decisions follow opa-envoy-plugin's object form (allowed, headers, http_status, ...) plus
# authz's extensions under the one key `authz` (reason, source, identity, rate_limit,
# credential, override, cache_ttl_s: docs/contract.md), where they cannot collide with a
# policy's own fields; authz renders the JSON deny body from `authz.reason`.
package authz.lib

# A deny with a stable snake_case reason code and an HTTP status.
deny(status, reason) := {"allowed": false, "http_status": status, "authz": {"reason": reason, "source": "deny"}}

# A deny the TTL override `override` (first_override) decided.
blocked_by(override) := object.union(
	deny(403, "blocked_by_override"),
	{"authz": {"override": override, "source": "override"}},
)

# `allow`, granted by the TTL override `override` where the rules alone would deny.
allowed_by(allow, override) := object.union(
	allow,
	{"authz": {"reason": "allowed_by_override", "override": override, "source": "override"}},
)

# A 401 that tells the client how to authenticate (RFC 6750 section 3). `error` is only
# sent when a credential was presented and rejected.
unauthorized(reason, presented) := object.union(deny(401, reason), {"headers": {"www-authenticate": challenge}}) if {
	presented == true
	challenge := `Bearer realm="authz", error="invalid_token"`
} else := object.union(deny(401, reason), {"headers": {"www-authenticate": `Bearer realm="authz"`}})

# A 407 that tells a client using the egress as its proxy how to authenticate
# (RFC 9110 sections 11.7.1 and 15.5.8; RFC 7617 Basic).
proxy_unauthorized(reason) := object.union(
	deny(407, reason),
	{"headers": {"proxy-authenticate": `Basic realm="authz-egress"`}},
)

# The request path rebuilt from input.parsed_path (percent-decoded, as the plugin builds
# it), so matching never sees a query string or encoded characters; lowercased, and so
# are the patterns it is matched against (match_path), so `/api/v1/Admin/x` cannot miss
# an admin rule on its way to a case-insensitive upstream.
request_path := lower(concat("/", ["", concat("/", input.parsed_path)]))

match_path(pattern) if glob.match(lower(pattern), ["/"], request_path)

# The request path as an upstream may read it: each segment lowercased, without leading
# whitespace (Unicode spaces and control characters too), without trailing whitespace and
# dots (Windows and IIS drop them), and without a format suffix (`admin.json`: Rails,
# Spring's suffix matching). A rule that must cover a resource under every spelling
# (a first-match path rule, a deny) matches with match_path_any_spelling; one that grants
# (egress allowed_paths, an allow override) with match_path, exactly as written.
normalized_path := lower(concat("/", ["", concat("/", [normalized_segment(s) | some s in input.parsed_path])]))

normalized_segment(segment) := regex.replace(trimmed, `^([^.]+)\..*$`, "$1") if {
	leading := regex.replace(segment, `^[\s\p{Z}\x00-\x1f\x7f]+`, "")
	trimmed := regex.replace(leading, `[\s\p{Z}\x00-\x1f\x7f.]+$`, "")
}

match_path_any_spelling(pattern) if match_path(pattern)

match_path_any_spelling(pattern) if glob.match(lower(pattern), ["/"], normalized_path)

# Dot segments must never reach path matching (Envoy normalizes them first; this is the
# second line of defense), nor path parameters: `/admin;x/users` misses an `/admin/**`
# rule, while servlet containers and Spring strip `;x` and serve /admin/users. Nor a
# segment of only dots, whitespace and control characters: an upstream that trims it
# finds a dot segment (`.. ` -> `..`) or an empty one and resolves the path elsewhere.
bad_path if {
	some segment in input.parsed_path
	segment in {".", ".."}
}

bad_path if {
	some segment in input.parsed_path
	regex.match(`^[\s\p{Z}\x00-\x1f\x7f.]+$`, segment)
}

bad_path if {
	some segment in input.parsed_path
	contains(segment, ";")
}

# Client-sent headers under our identity prefix that a decision does not set itself:
# they are removed so an upstream never trusts a forged one.
forged_identity_headers(prefix, kept) := [name |
	some name, _ in input.attributes.request.http.headers
	startswith(name, prefix)
	not name in kept
]

# TTL overrides granted through authz's admin API (data.overrides, pushed by authz, outside
# the bundle). `overrides_for(path, field, id)` are the unexpired ones for this decision
# path and identity that match the request's path and method. A deny's path matches every
# spelling of it (match_path_any_spelling), an allow's only as written.
overrides_for(decision_path, id_field, id) := {o |
	some o in data.overrides
	o.decision_path == decision_path
	o.match[id_field] == id
	time.now_ns() < o.expires_at_ns
	override_matches_request(o)
}

override_matches_request(o) if {
	path_matches(o)
	method_matches(o.match)
}

path_matches(o) if not o.match.path

path_matches(o) if {
	o.effect == "allow"
	match_path(o.match.path)
}

path_matches(o) if {
	o.effect != "allow"
	match_path_any_spelling(o.match.path)
}

method_matches(match) if not match.methods

method_matches(match) if upper(input.attributes.request.http.method) in match.methods

# The first (by id) override with `effect`, as the decision's `authz.override` field.
first_override(overrides, effect) := {"id": ids[0], "reason": reasons[ids[0]]} if {
	reasons := {o.id: o.reason | some o in overrides; o.effect == effect}
	ids := sort(object.keys(reasons))
	count(ids) > 0
}
