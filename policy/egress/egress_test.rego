package authz.egress_test

import data.authz.egress

# Sandboxes are mocked; tokens only as digests, exactly as authz presents them.
sandboxes := {
	"sb-default": {"tier": "default", "enabled": true, "token_sha256": crypto.sha256("t-default")},
	"sb-restricted": {"tier": "restricted", "enabled": true, "token_sha256": crypto.sha256("t-restricted")},
	"sb-standard": {"tier": "standard", "enabled": true, "token_sha256": crypto.sha256("t-standard")},
	"sb-premium": {"tier": "premium", "enabled": true, "token_sha256": crypto.sha256("t-premium")},
	"sb-admin": {"tier": "admin", "enabled": true, "token_sha256": crypto.sha256("t-admin")},
	"sb-off": {"tier": "admin", "enabled": false, "token_sha256": crypto.sha256("t-off")},
	"sb-no-enabled": {"tier": "admin", "token_sha256": crypto.sha256("t-no-enabled")},
	"sb-no-tier": {"tier": "nonexistent", "enabled": true, "token_sha256": crypto.sha256("t-no-tier")},
}

req(id, token, service, method, path, extra) := {
	"attributes": {
		"request": {"http": {
			"method": method,
			"path": path,
			"host": service,
			"headers": object.union_n([{"host": service}, sandbox_headers(id, token), extra]),
		}},
		"contextExtensions": {"decision_path": "authz/egress/decision", "service": service},
	},
	"parsed_path": split(trim_left(split(path, "?")[0], "/"), "/"),
	"parsed_query": {},
	"credentials": token_credentials(token),
}

sandbox_headers(id, token) := object.union(id_header(id), token_header(token))

id_header(id) := {"x-sandbox-id": id} if id != null

else := {}

token_header(token) := {"x-sandbox-token": sprintf("sha256:%s", [crypto.sha256(token)])} if token != null

else := {}

token_credentials(token) := {"x-sandbox-token": crypto.sha256(token)} if token != null

else := {}

decide(id, token, service, method, path) := d if {
	d := egress.decision with input as req(id, token, service, method, path, {})
		with data.egress.sandboxes as sandboxes
}

# One allowed request per service, used for the tier x service matrix.
probe := {
	"httpbin": ["GET", "/get"],
	"openai": ["POST", "/v1/chat/completions"],
	"anthropic": ["POST", "/v1/messages"],
	"github": ["GET", "/repos/acme/widgets/issues"],
	"slack": ["POST", "/api/chat.postMessage"],
}

# Expected access, written by hand (not derived from data.egress.tiers).
tier_services := {
	"default": set(),
	"restricted": {"httpbin"},
	"standard": {"openai", "anthropic", "github"},
	"premium": {"httpbin", "openai", "anthropic", "github", "slack"},
	"admin": {"httpbin", "openai", "anthropic", "github", "slack"},
}

test_every_tier_by_every_service if {
	every tier, allowed_services in tier_services {
		every service, call in probe {
			d := decide(concat("-", ["sb", tier]), concat("-", ["t", tier]), service, call[0], call[1])
			expect_allowed := service in allowed_services
			print(tier, service, d.authz.reason) # shown for the failing case
			d.allowed == expect_allowed
			expect_reason(d, expect_allowed)
		}
	}
}

expect_reason(d, true) if d.authz.reason == "allowed"

expect_reason(d, false) if {
	d.authz.reason == "service_not_allowed"
	d.http_status == 403
}

# [name, sandbox, token, service, method, path, expected status, expected reason]
cases := [
	["no sandbox id", null, "t-admin", "openai", "GET", "/v1/models", 401, "missing_sandbox_id"],
	["unknown sandbox", "sb-nope", "t-admin", "openai", "GET", "/v1/models", 401, "unknown_sandbox"],
	["no token", "sb-admin", null, "openai", "GET", "/v1/models", 401, "missing_sandbox_token"],
	["wrong token", "sb-admin", "t-standard", "openai", "GET", "/v1/models", 401, "invalid_sandbox_token"],
	["disabled", "sb-off", "t-off", "openai", "GET", "/v1/models", 401, "sandbox_disabled"],
	["enabled missing", "sb-no-enabled", "t-no-enabled", "openai", "GET", "/v1/models", 401, "sandbox_disabled"],
	["tier missing", "sb-no-tier", "t-no-tier", "openai", "GET", "/v1/models", 403, "service_not_allowed"],
	["unknown service", "sb-admin", "t-admin", "evil", "GET", "/", 403, "unknown_service"],
	["empty service", "sb-admin", "t-admin", "", "GET", "/", 403, "unknown_service"],
	["openai models", "sb-standard", "t-standard", "openai", "GET", "/v1/models", 200, "allowed"],
	["openai model by id", "sb-standard", "t-standard", "openai", "GET", "/v1/models/gpt-x", 200, "allowed"],
	["openai model subpath", "sb-standard", "t-standard", "openai", "GET", "/v1/models/a/b", 403, "path_not_allowed"],
	["openai delete", "sb-standard", "t-standard", "openai", "DELETE", "/v1/models/gpt-x", 403, "method_not_allowed"],
	["openai files", "sb-standard", "t-standard", "openai", "POST", "/v1/files", 403, "path_not_allowed"],
	["openai query ignored", "sb-standard", "t-standard", "openai", "GET", "/v1/models?x=/v1/files", 200, "allowed"],
	["openai dotdot", "sb-standard", "t-standard", "openai", "GET", "/v1/models/../files", 400, "invalid_path"],
	["anthropic messages", "sb-standard", "t-standard", "anthropic", "POST", "/v1/messages", 200, "allowed"],
	[
		"anthropic batches", "sb-standard", "t-standard", "anthropic", "POST", "/v1/messages/batches",
		403, "path_not_allowed",
	],
	["anthropic put", "sb-standard", "t-standard", "anthropic", "PUT", "/v1/messages", 403, "method_not_allowed"],
	["github deep repo", "sb-standard", "t-standard", "github", "PATCH", "/repos/a/b/issues/1", 200, "allowed"],
	["github org repos", "sb-standard", "t-standard", "github", "GET", "/orgs/acme/repos", 200, "allowed"],
	["github org members", "sb-standard", "t-standard", "github", "GET", "/orgs/acme/members", 403, "path_not_allowed"],
	["github delete", "sb-standard", "t-standard", "github", "DELETE", "/repos/a/b", 403, "method_not_allowed"],
	["github user", "sb-premium", "t-premium", "github", "GET", "/user", 200, "allowed"],
	["github user suffix", "sb-premium", "t-premium", "github", "GET", "/users/x", 403, "path_not_allowed"],
	["slack post", "sb-premium", "t-premium", "slack", "POST", "/api/chat.postMessage", 200, "allowed"],
	["slack get", "sb-premium", "t-premium", "slack", "GET", "/api/chat.postMessage", 403, "method_not_allowed"],
	["slack admin api", "sb-admin", "t-admin", "slack", "POST", "/api/admin.users.list", 403, "path_not_allowed"],
	["httpbin status", "sb-restricted", "t-restricted", "httpbin", "GET", "/status/418", 200, "allowed"],
	["httpbin anything deep", "sb-restricted", "t-restricted", "httpbin", "POST", "/anything/a/b", 200, "allowed"],
	["httpbin delete", "sb-restricted", "t-restricted", "httpbin", "DELETE", "/anything", 403, "method_not_allowed"],
	["httpbin headers", "sb-restricted", "t-restricted", "httpbin", "GET", "/headers", 403, "path_not_allowed"],
	["lowercase method", "sb-restricted", "t-restricted", "httpbin", "get", "/get", 200, "allowed"],
]

test_cases if {
	every c in cases {
		d := decide(c[1], c[2], c[3], c[4], c[5])
		status := object.get(d, "http_status", 200)
		print(c[0], status, d.authz.reason) # shown for the failing case
		status == c[6]
		d.authz.reason == c[7]
	}
}

test_401_carries_challenge if {
	decide(null, null, "openai", "GET", "/v1/models").headers["www-authenticate"] == `Bearer realm="authz"`
}

test_allow_injects_by_reference_and_strips_sandbox_headers if {
	extra := {
		"authorization": "Bearer sandbox-supplied",
		"x-api-key": "sandbox-supplied",
		"cookie": "a=b",
		"x-sandbox-trace": "1",
		"x-authz-role": "admin",
		"accept": "application/json",
	}
	d := egress.decision with input as req("sb-standard", "t-standard", "anthropic", "POST", "/v1/messages", extra)
		with data.egress.sandboxes as sandboxes
	d.allowed
	d.authz.credential == {"ref": "anthropic", "header": "x-api-key", "format": "{secret}"}
	removed := [
		"x-sandbox-id", "x-sandbox-token", "authorization", "x-api-key", "cookie", "x-sandbox-trace",
		"x-authz-role",
	]
	every name in removed {
		name in d.request_headers_to_remove
	}
	not "accept" in d.request_headers_to_remove
	d.authz.rate_limit == {"tier": "standard", "key": "sandbox:sb-standard:anthropic", "requests_per_minute": 60}
	d.authz.identity == {"sandbox_id": "sb-standard", "service": "anthropic", "tier": "standard"}
}

# One list of credentials (authz.core.headers): whatever authz hashed (input.credentials, which
# AUTHZ_CREDENTIAL_HEADERS may extend) is stripped, and so are client-sent forwarding and
# method-override headers: a third party learns neither the sandbox's address nor a
# method other than the one the policy checked.
test_allow_strips_every_credential_and_forwarding_header if {
	sent := {
		"api-key": "sha256:00",
		"x-goog-api-key": "sha256:00",
		"proxy-authorization": "Basic sha256:00",
		"x-upstream-token": "sha256:00",
		"forwarded": "for=10.0.0.1;host=internal",
		"x-forwarded-for": "10.0.0.1",
		"x-forwarded-host": "internal.example",
		"x-forwarded-proto": "https",
		"x-real-ip": "10.0.0.1",
		"x-http-method-override": "DELETE",
		"x-method-override": "DELETE",
		"accept": "application/json",
	}
	hashed := {"x-upstream-token": "00", "api-key": "00", "x-goog-api-key": "00", "proxy-authorization": "00"}
	r := object.union(req("sb-standard", "t-standard", "openai", "GET", "/v1/models", sent), {"credentials": hashed})
	d := egress.decision with input as r with data.egress.sandboxes as sandboxes
	d.allowed
	every name, _ in object.remove(sent, ["accept"]) {
		name in d.request_headers_to_remove
	}
	not "accept" in d.request_headers_to_remove
}

test_no_secret_or_token_in_decision if {
	d := decide("sb-standard", "t-standard", "openai", "GET", "/v1/models")
	not contains(json.marshal(d), crypto.sha256("t-standard"))
}

test_rate_limit_per_sandbox_and_service if {
	a := decide("sb-admin", "t-admin", "openai", "GET", "/v1/models")
	b := decide("sb-admin", "t-admin", "github", "GET", "/user")
	a.authz.rate_limit.key != b.authz.rate_limit.key
	a.authz.rate_limit.requests_per_minute == 1000
}

test_service_from_host_when_route_does_not_say if {
	r := json.patch(req("sb-standard", "t-standard", "openai", "GET", "/v1/models", {}), [
		{"op": "remove", "path": "/attributes/contextExtensions"},
		{"op": "replace", "path": "/attributes/request/http/host", "value": "openai:8443"},
	])
	d := egress.decision with input as r with data.egress.sandboxes as sandboxes
	d.allowed
	d.authz.identity.service == "openai"
}

test_header_only_mode_skips_token if {
	d := egress.decision with input as req("sb-standard", null, "openai", "GET", "/v1/models", {})
		with data.egress.sandboxes as sandboxes
		with data.egress.identity.mode as "header"
	d.allowed
}

test_header_only_mode_is_warned if {
	w := data.authz.meta.warnings with data.egress.identity.mode as "header"
	count(w) == 1
	count(data.authz.meta.warnings) == 0
}

# The shipped services and tiers are well formed.
test_shipped_services_well_formed if {
	every name, s in data.egress.services {
		regex.match(`^[a-z][a-z0-9-]*$`, name)
		regex.match(`^https?://[^/?#]+(/[^?#]*)?$`, s.base_url)
		count(s.allowed_methods) > 0
		every p in s.allowed_paths {
			startswith(p, "/")
		}
		valid_credential(s)
		every m, paths in object.get(s, "paths_by_method", {}) {
			m in s.allowed_methods
			every p in paths {
				startswith(p, "/")
			}
		}
		every rule in object.get(s, "denied_paths", []) {
			count(rule.methods) > 0
			count(rule.paths) > 0
			every p in rule.paths {
				startswith(p, "/")
			}
		}
	}
	every _, t in data.egress.tiers {
		is_number(t.rate_limit.requests_per_minute)
		t.rate_limit.requests_per_minute >= -1
	}
}

valid_credential(s) if not s.credential

valid_credential(s) if {
	regex.match(`^[a-z0-9-]+$`, s.credential.header)
	strings.count(s.credential.format, "{secret}") == 1
}

test_tiers_name_known_services if {
	every _, t in data.egress.tiers {
		every svc in t.services {
			known_service(svc)
		}
	}
}

known_service("*")

known_service(svc) if data.egress.services[svc]

test_shipped_sandboxes_well_formed if {
	every id, sb in object.get(data.egress, "sandboxes", {}) {
		regex.match(`^[A-Za-z0-9._-]+$`, id)
		regex.match(`^[0-9a-f]{64}$`, sb.token_sha256)
		data.egress.tiers[sandbox_tier(sb)]
		is_boolean(sb.enabled)
	}
}

# A sandbox's own tier, else its namespace's default.
sandbox_tier(sb) := object.get(
	sb, "tier",
	object.get(egress_namespaces, [object.get(sb, "namespace", ""), "tier"], null),
)

default egress_namespaces := {}

egress_namespaces := data.egress.namespaces

test_data_check_takes_the_tier_from_the_namespace if {
	agents := {"labs/agents": {"tier": "standard"}}
	sandbox_tier({"tier": "premium", "namespace": "labs/agents"}) == "premium" with data.egress.namespaces as agents
	sandbox_tier({"namespace": "labs/agents"}) == "standard" with data.egress.namespaces as agents
	sandbox_tier({"namespace": "labs/agents"}) == null with data.egress.namespaces as {}
}

# -- TTL overrides -------------------------------------------------------------------------

eovr(id, effect, match) := {
	"id": id,
	"effect": effect,
	"decision_path": "authz/egress/decision",
	"match": match,
	"reason": "test",
	"expires_at_ns": time.now_ns() + 3600000000000,
}

decide_with(id, token, service, method, path, overrides) := d if {
	d := egress.decision with input as req(id, token, service, method, path, {})
		with data.egress.sandboxes as sandboxes
		with data.overrides as overrides
}

test_override_lets_a_sandbox_use_a_service_for_a_while if {
	o := {"o1": eovr("o1", "allow", {"sandbox_id": "sb-standard", "service": "slack"})}
	d := decide_with("sb-standard", "t-standard", "slack", "POST", "/api/chat.postMessage", o)
	d.allowed
	d.authz.reason == "allowed_by_override"
	d.authz.credential.ref == "slack"
	without := decide_with("sb-standard", "t-standard", "slack", "POST", "/api/chat.postMessage", {})
	without.authz.reason == "service_not_allowed"
}

test_service_scoped_override_does_not_leak if {
	o := {"o1": eovr("o1", "allow", {"sandbox_id": "sb-standard", "service": "slack"})}
	decide_with("sb-standard", "t-standard", "openai", "POST", "/v1/files", o).authz.reason == "path_not_allowed"
}

test_block_override_stops_a_sandbox if {
	o := {"o1": eovr("o1", "deny", {"sandbox_id": "sb-admin"})}
	d := decide_with("sb-admin", "t-admin", "openai", "GET", "/v1/models", o)
	d.authz.reason == "blocked_by_override"
	d.http_status == 403
}

test_override_needs_a_valid_token if {
	o := {"o1": eovr("o1", "allow", {"sandbox_id": "sb-standard"})}
	d := decide_with("sb-standard", "wrong", "slack", "POST", "/api/chat.postMessage", o)
	d.authz.reason == "invalid_sandbox_token"
}

test_denies_name_the_sandbox_and_the_tier_only_once_proven if {
	d := decide("sb-standard", "t-standard", "slack", "POST", "/api/chat.postMessage")
	d.authz.identity == {"sandbox_id": "sb-standard", "service": "slack", "tier": "standard"}
	bad := decide("sb-standard", "wrong", "openai", "GET", "/v1/models")
	bad.authz.identity == {"sandbox_id": "sb-standard", "service": "openai"}
	not decide("sb-nope", "x", "openai", "GET", "/v1/models").authz.identity
}

# -- security review ------------------------------------------------------------------------

# README: an allow override "lets it through the tier/method/path rules it matched". For
# a sandbox on the `default` tier (no services) the decision still carries the tier's
# rate limit, requests_per_minute 0, so authz answers 429 rate_limited to every request
# the override allowed: overrides cannot help exactly the sandboxes that need them.
test_allow_override_is_usable_on_the_default_tier if {
	o := {"o1": eovr("o1", "allow", {"sandbox_id": "sb-default", "service": "openai"})}
	d := decide_with("sb-default", "t-default", "openai", "GET", "/v1/models", o)
	d.allowed
	d.authz.reason == "allowed_by_override"
	d.authz.rate_limit.requests_per_minute != 0
}

# README: authz "injects the real credential from a secrets file the sandbox never sees".
# httpbin's allowed paths (/get, /post, /anything/**) answer with the request's headers,
# so the injected Authorization: Bearer <secret> comes back to the sandbox in the body.
test_echo_service_is_given_no_credential if {
	every path in ["/get", "/anything/x"] {
		d := decide("sb-restricted", "t-restricted", "httpbin", "GET", path)
		d.allowed
		not d.authz.credential
	}
}

# Namespaces: a sandbox without its own tier gets its namespace's default tier.
ns_sandboxes := {
	"sb-ns": {"namespace": "labs/agents", "enabled": true, "token_sha256": crypto.sha256("t-ns")},
	"sb-ns-own": {
		"namespace": "labs/agents", "tier": "premium", "enabled": true,
		"token_sha256": crypto.sha256("t-ns-own"),
	},
}

ns_decide(id, token, service, method, path) := d if {
	d := egress.decision with input as req(id, token, service, method, path, {})
		with data.egress.sandboxes as ns_sandboxes
		with data.egress.namespaces as {"labs/agents": {"tier": "standard"}}
}

test_namespace_default_tier_applies if {
	d := ns_decide("sb-ns", "t-ns", "openai", "POST", "/v1/chat/completions")
	d.allowed
	d.authz.source == "namespace_default"
	d.authz.rate_limit.tier == "standard"
	d.authz.identity == {"sandbox_id": "sb-ns", "service": "openai", "tier": "standard", "namespace": "labs/agents"}
	ns_decide("sb-ns", "t-ns", "slack", "POST", "/api/chat.postMessage").authz.reason == "service_not_allowed"
}

test_sandbox_own_tier_wins_over_namespace if {
	d := ns_decide("sb-ns-own", "t-ns-own", "slack", "POST", "/api/chat.postMessage")
	d.allowed
	d.authz.source == "policy_rule"
	d.authz.rate_limit.tier == "premium"
}

test_egress_deny_source if {
	decide("sb-standard", "wrong", "openai", "GET", "/v1/models").authz.source == "deny"
	decide("sb-standard", "t-standard", "openai", "GET", "/v1/models").authz.source == "policy_rule"
}

test_unknown_sandbox_namespace_is_a_bundle_warning if {
	w := data.authz.meta.warnings with data.egress.sandboxes as ns_sandboxes with data.egress.namespaces as {}
	w == {
		`sandbox "sb-ns" names namespace "labs/agents", which data.egress.namespaces does not define`,
		`sandbox "sb-ns-own" names namespace "labs/agents", which data.egress.namespaces does not define`,
	}
}

# -- authz's admin preview (input.preview) ---------------------------------------------------

preview_decide(id, service, method, path) := d if {
	i := object.union(req(null, null, service, method, path, {}), {"preview": {"sandbox_id": id}})
	d := egress.decision with input as i with data.egress.sandboxes as sandboxes
}

test_preview_takes_the_sandbox_as_proven if {
	d := preview_decide("sb-standard", "openai", "GET", "/v1/models")
	d.allowed
	d.authz.identity.tier == "standard"
	preview_decide("sb-standard", "slack", "POST", "/api/chat.postMessage").authz.reason == "service_not_allowed"
	preview_decide("sb-off", "openai", "GET", "/v1/models").authz.reason == "sandbox_disabled"
	preview_decide("sb-nope", "openai", "GET", "/v1/models").authz.reason == "unknown_sandbox"
}

test_without_preview_the_token_is_required if {
	decide("sb-standard", null, "openai", "GET", "/v1/models").authz.reason == "missing_sandbox_token"
}

# -- least privilege in the shipped data (issue #13, finding 10) ------------------------------

# GitHub: read, plus a short named write set (issues, issue comments, pull requests, PR
# comments and reviews). Deploy keys, hooks, transfer, collaborators, Actions secrets and
# repository settings (PATCH /repos/{o}/{r}: e.g. making a repository public) are denied
# outright, whatever the tier. [name, sandbox, method, path, status, reason]
github_cases := [
	["read repo", "sb-standard", "GET", "/repos/a/b", 200, "allowed"],
	["read issues", "sb-standard", "GET", "/repos/a/b/issues", 200, "allowed"],
	["read contents", "sb-standard", "GET", "/repos/a/b/contents/README.md", 200, "allowed"],
	["open issue", "sb-standard", "POST", "/repos/a/b/issues", 200, "allowed"],
	["edit issue", "sb-standard", "PATCH", "/repos/a/b/issues/1", 200, "allowed"],
	["comment on issue", "sb-standard", "POST", "/repos/a/b/issues/1/comments", 200, "allowed"],
	["edit issue comment", "sb-standard", "PATCH", "/repos/a/b/issues/comments/9", 200, "allowed"],
	["open pull request", "sb-standard", "POST", "/repos/a/b/pulls", 200, "allowed"],
	["edit pull request", "sb-standard", "PATCH", "/repos/a/b/pulls/3", 200, "allowed"],
	["review pull request", "sb-standard", "POST", "/repos/a/b/pulls/3/reviews", 200, "allowed"],
	["comment on pull request", "sb-standard", "POST", "/repos/a/b/pulls/3/comments", 200, "allowed"],
	["edit pull request comment", "sb-standard", "PATCH", "/repos/a/b/pulls/comments/9", 200, "allowed"],
	["add deploy key", "sb-standard", "POST", "/repos/a/b/keys", 403, "path_denied"],
	["list deploy keys", "sb-standard", "GET", "/repos/a/b/keys", 403, "path_denied"],
	["read deploy key", "sb-standard", "GET", "/repos/a/b/keys/1", 403, "path_denied"],
	["add hook", "sb-standard", "POST", "/repos/a/b/hooks", 403, "path_denied"],
	["edit hook", "sb-standard", "PATCH", "/repos/a/b/hooks/1/config", 403, "path_denied"],
	["transfer", "sb-standard", "POST", "/repos/a/b/transfer", 403, "path_denied"],
	["list collaborators", "sb-standard", "GET", "/repos/a/b/collaborators", 403, "path_denied"],
	["collaborator permission", "sb-standard", "GET", "/repos/a/b/collaborators/x/permission", 403, "path_denied"],
	["list actions secrets", "sb-standard", "GET", "/repos/a/b/actions/secrets", 403, "path_denied"],
	["actions public key", "sb-standard", "GET", "/repos/a/b/actions/secrets/public-key", 403, "path_denied"],
	["repository settings", "sb-standard", "PATCH", "/repos/a/b", 403, "path_denied"],
	["settings as admin tier", "sb-admin", "PATCH", "/repos/a/b", 403, "path_denied"],
	["hook as admin tier", "sb-admin", "POST", "/repos/a/b/hooks", 403, "path_denied"],
	["hook with a suffix", "sb-standard", "POST", "/repos/a/b/hooks.json", 403, "path_denied"],
	["hook with a trailing dot", "sb-standard", "POST", "/repos/a/b/hooks./1", 403, "path_denied"],
	["settings case", "sb-standard", "GET", "/REPOS/a/b/Keys", 403, "path_denied"],
	["fork", "sb-standard", "POST", "/repos/a/b/forks", 403, "path_not_allowed"],
	["create ref", "sb-standard", "POST", "/repos/a/b/git/refs", 403, "path_not_allowed"],
	["merge pull request", "sb-standard", "PUT", "/repos/a/b/pulls/3/merge", 403, "method_not_allowed"],
	["edit repository contents", "sb-standard", "PATCH", "/repos/a/b/contents/x", 403, "path_not_allowed"],
	["edit a release", "sb-standard", "PATCH", "/repos/a/b/releases/1", 403, "path_not_allowed"],
]

test_github_is_read_plus_a_named_write_set if {
	every c in github_cases {
		d := decide(c[1], concat("-", ["t", substring(c[1], 3, -1)]), "github", c[2], c[3])
		status := object.get(d, "http_status", 200)
		print(c[0], status, d.authz.reason) # shown for the failing case
		status == c[4]
		d.authz.reason == c[5]
	}
}

# An explicit deny is not an exception an override can lift.
test_allow_override_cannot_lift_an_explicit_deny if {
	o := {"o1": eovr("o1", "allow", {"sandbox_id": "sb-standard", "service": "github", "path": "/repos/a/b/hooks"})}
	d := decide_with("sb-standard", "t-standard", "github", "POST", "/repos/a/b/hooks", o)
	d.authz.reason == "path_denied"
	d.http_status == 403
}

# An allow override names the one service it opens (authz's admin API refuses one
# without): one left without a service, e.g. in an older overrides file, opens nothing.
test_allow_override_without_a_service_opens_nothing if {
	o := {"o1": eovr("o1", "allow", {"sandbox_id": "sb-standard"})}
	d := decide_with("sb-standard", "t-standard", "slack", "POST", "/api/chat.postMessage", o)
	d.authz.reason == "service_not_allowed"
	decide_with("sb-standard", "t-standard", "openai", "POST", "/v1/files", o).authz.reason == "path_not_allowed"
}

test_deny_override_without_a_service_blocks_every_service if {
	o := {"o1": eovr("o1", "deny", {"sandbox_id": "sb-standard"})}
	every service in ["openai", "github"] {
		decide_with("sb-standard", "t-standard", service, "GET", "/user", o).authz.reason == "blocked_by_override"
	}
}

test_override_naming_an_unknown_sandbox_or_service_is_a_bundle_warning if {
	o := {
		"o1": eovr("o1", "deny", {"sandbox_id": "sb-gone"}),
		"o2": eovr("o2", "allow", {"sandbox_id": "sb-standard", "service": "gitlab"}),
		"o3": eovr("o3", "allow", {"sandbox_id": "sb-standard"}),
		"o4": eovr("o4", "allow", {"sandbox_id": "sb-standard", "service": "openai"}),
	}
	w := data.authz.meta.warnings with data.egress.sandboxes as sandboxes with data.overrides as o
	w == {
		`override "o1" names sandbox "sb-gone", which data.egress.sandboxes does not define`,
		`override "o2" names service "gitlab", which data.egress.services does not define`,
		`override "o3" allows sandbox "sb-standard" without naming a service: the egress policy ignores it`,
	}
}

# -- issue 18: Proxy-Authorization, intercepted CONNECT, inner hop, tunnels -------------

basic(id, token) := {"user": id, "password_sha256": crypto.sha256(token)}

# A request through the egress as a proxy: `authority` is the CONNECT target or the
# Host, `ext` the route's context_extensions, `proxy` input.proxy_authorization (null:
# none), `extra` more headers.
proxy_req(method, authority, path, ext, proxy, extra) := object.union(
	{
		"attributes": {
			"request": {"http": {
				"method": method,
				"path": path,
				"host": authority,
				"headers": object.union({"host": authority}, extra),
			}},
			"contextExtensions": object.union({"decision_path": "authz/egress/decision"}, ext),
		},
		"parsed_path": split(trim_left(path, "/"), "/"),
		"parsed_query": {},
		"credentials": proxy_credentials(proxy),
	},
	proxy_field(proxy),
)

proxy_credentials(proxy) := {"proxy-authorization": "d1gest"} if proxy != null

else := {}

proxy_field(proxy) := {"proxy_authorization": proxy} if proxy != null

else := {}

proxy_decide(method, authority, path, ext, proxy, extra) := d if {
	d := egress.decision with input as proxy_req(method, authority, path, ext, proxy, extra)
		with data.egress.sandboxes as sandboxes
}

intercept_ext(service) := {"service": service, "hop": "outer"}

inner_ext(service) := {"service": service, "hop": "inner"}

tunnel_ext := {"service": "", "hop": "outer", "tunnel": "true"}

test_connect_with_proxy_basic_of_a_tier_with_the_service_opens_the_tunnel if {
	d := proxy_decide("CONNECT", "api.openai.com:443", "", intercept_ext("openai"), basic("sb-standard", "t-standard"), {})
	d.allowed == true
	d.dynamic_metadata.sandbox_id == "sb-standard"
	not d.authz.credential
	d.authz.rate_limit.key == "sandbox:sb-standard:connect"
}

test_connect_of_a_tier_without_the_service_is_service_not_allowed if {
	d := proxy_decide("CONNECT", "slack.com:443", "", intercept_ext("slack"), basic("sb-standard", "t-standard"), {})
	d.allowed == false
	d.http_status == 403
	d.authz.reason == "service_not_allowed"
}

proxy_auth_cases := [
	# [proxy_authorization, credentials present, reason]
	[null, false, "missing_sandbox_id"],
	[basic("sb-standard", "wrong"), true, "invalid_sandbox_token"],
	[basic("sb-nope", "t-standard"), true, "unknown_sandbox"],
	[basic("sb-off", "t-off"), true, "sandbox_disabled"],
]

test_connect_without_valid_proxy_credentials_is_407_with_proxy_authenticate if {
	every case in proxy_auth_cases {
		d := proxy_decide("CONNECT", "api.openai.com:443", "", intercept_ext("openai"), case[0], {})
		d.allowed == false
		d.http_status == 407
		d.authz.reason == case[2]
		d.headers["proxy-authenticate"] == `Basic realm="authz-egress"`
	}
}

test_malformed_proxy_authorization_is_407_invalid_proxy_authorization if {
	d := egress.decision with input as object.union(
		proxy_req("CONNECT", "api.openai.com:443", "", intercept_ext("openai"), null, {}),
		{"credentials": {"proxy-authorization": "d1gest"}},
	)
		with data.egress.sandboxes as sandboxes
	d.http_status == 407
	d.authz.reason == "invalid_proxy_authorization"
}

test_absolute_form_request_with_proxy_basic_is_checked_and_gets_the_credential if {
	ext := {"service": "openai", "proxy": "true"}
	d := proxy_decide("GET", "api.openai.com", "/v1/models", ext, basic("sb-standard", "t-standard"), {})
	d.allowed == true
	d.authz.credential.ref == "openai"
	"proxy-authorization" in d.request_headers_to_remove
}

test_absolute_form_request_without_credentials_is_407 if {
	d := proxy_decide("GET", "api.openai.com", "/v1/models", {"service": "openai", "proxy": "true"}, null, {})
	d.http_status == 407
}

test_plain_request_without_identity_stays_401_bearer if {
	d := decide(null, null, "openai", "GET", "/v1/models")
	d.http_status == 401
	d.headers["www-authenticate"] == `Bearer realm="authz"`
}

test_inner_request_is_the_tunnel_sandbox_without_a_token if {
	d := proxy_decide("GET", "api.openai.com", "/v1/models", inner_ext("openai"), null, {"x-sandbox-id": "sb-standard"})
	d.allowed == true
	d.authz.identity.sandbox_id == "sb-standard"
	d.authz.credential.ref == "openai"
}

test_inner_request_ignores_proxy_credentials_of_another_sandbox if {
	# x-sandbox-id is what Envoy set from the CONNECT; the client's Basic is not used.
	premium := basic("sb-premium", "t-premium")
	path := "/api/chat.postMessage"
	d := proxy_decide("GET", "slack.com", path, inner_ext("slack"), premium, {"x-sandbox-id": "sb-standard"})
	d.allowed == false
	d.authz.reason == "service_not_allowed"
	d.authz.identity.sandbox_id == "sb-standard"
}

test_inner_request_is_checked_by_method_and_path if {
	d := proxy_decide("GET", "api.openai.com", "/v1/files", inner_ext("openai"), null, {"x-sandbox-id": "sb-standard"})
	d.authz.reason == "path_not_allowed"
}

test_outer_request_with_only_an_id_header_still_needs_the_token if {
	# Only the inner hop vouches for the id header; the outer listener does not.
	ext := {"service": "openai", "hop": "outer"}
	d := proxy_decide("GET", "openai", "/v1/models", ext, null, {"x-sandbox-id": "sb-standard"})
	d.authz.reason == "missing_sandbox_token"
}

tunnel_cases := [
	# [sandbox, token, authority, allowed, reason]
	["sb-standard", "t-standard", "pypi.org:443", true, "allowed"],
	["sb-standard", "t-standard", "PyPI.org:443", true, "allowed"],
	["sb-premium", "t-premium", "objects.githubusercontent.com:443", true, "allowed"],
	["sb-premium", "t-premium", "githubusercontent.com:443", false, "tunnel_not_allowed"],
	["sb-premium", "t-premium", "evilgithubusercontent.com:443", false, "tunnel_not_allowed"],
	["sb-standard", "t-standard", "pypi.org:8443", false, "tunnel_not_allowed"],
	["sb-standard", "t-standard", "example.com:443", false, "tunnel_not_allowed"],
	["sb-restricted", "t-restricted", "pypi.org:443", false, "tunnel_not_allowed"],
	["sb-standard", "t-standard", "127.0.0.1:443", false, "ip_literal_not_allowed"],
	["sb-standard", "t-standard", "169.254.169.254:80", false, "ip_literal_not_allowed"],
	["sb-standard", "t-standard", "2130706433:443", false, "ip_literal_not_allowed"],
	["sb-standard", "t-standard", "0x7f.1:443", false, "ip_literal_not_allowed"],
	["sb-standard", "t-standard", "[::1]:443", false, "invalid_tunnel_target"],
	["sb-standard", "t-standard", "pypi.org", false, "invalid_tunnel_target"],
	["sb-standard", "t-standard", "pypi.org:0", false, "invalid_tunnel_target"],
	["sb-standard", "t-standard", "pypi.org:99999", false, "invalid_tunnel_target"],
	["sb-standard", "t-standard", "localhost:443", false, "address_not_allowed"],
	["sb-standard", "t-standard", "metadata.google.internal:80", false, "address_not_allowed"],
	["sb-standard", "t-standard", "x.localhost:443", false, "address_not_allowed"],
	["sb-admin", "t-admin", "api.openai.com:8443", false, "service_host_not_tunnelable"],
	["sb-admin", "t-admin", "api.github.com:443", false, "service_host_not_tunnelable"],
]

test_tunnel_targets if {
	every case in tunnel_cases {
		d := proxy_decide("CONNECT", case[2], "", tunnel_ext, basic(case[0], case[1]), {})
		d.allowed == case[3]
		d.authz.reason == case[4]
	}
}

test_tunnel_allow_names_the_host_for_authz_and_injects_nothing if {
	d := proxy_decide("CONNECT", "pypi.org:443", "", tunnel_ext, basic("sb-standard", "t-standard"), {})
	d.authz.tunnel == {"host": "pypi.org", "port": 443}
	not d.authz.credential
	d.authz.rate_limit.key == "sandbox:sb-standard:tunnel"
	d.dynamic_metadata.destination == "pypi.org:443"
}

test_tunnel_hosts_of_a_deployment_overlay_count_for_the_tier if {
	sandbox := basic("sb-standard", "t-standard")
	d := egress.decision with input as proxy_req("CONNECT", "allowed.test:443", "", tunnel_ext, sandbox, {})
		with data.egress.sandboxes as sandboxes
		with data.egress.tunnel_hosts as {"standard": ["allowed.test"]}
	d.allowed == true
}

test_a_deny_override_without_a_service_blocks_tunnels if {
	override := {
		"id": "ovr-1", "effect": "deny", "decision_path": "authz/egress/decision",
		"match": {"sandbox_id": "sb-standard"}, "reason": "incident",
		"expires_at_ns": time.now_ns() + 60000000000,
	}
	standard := basic("sb-standard", "t-standard")
	d := egress.decision with input as proxy_req("CONNECT", "pypi.org:443", "", tunnel_ext, standard, {})
		with data.egress.sandboxes as sandboxes
		with data.overrides as {"ovr-1": override}
	d.allowed == false
	d.authz.reason == "blocked_by_override"
}

test_a_deny_override_for_one_service_leaves_tunnels_alone if {
	override := {
		"id": "ovr-1", "effect": "deny", "decision_path": "authz/egress/decision",
		"match": {"sandbox_id": "sb-standard", "service": "openai"}, "reason": "incident",
		"expires_at_ns": time.now_ns() + 60000000000,
	}
	standard := basic("sb-standard", "t-standard")
	d := egress.decision with input as proxy_req("CONNECT", "pypi.org:443", "", tunnel_ext, standard, {})
		with data.egress.sandboxes as sandboxes
		with data.overrides as {"ovr-1": override}
	d.allowed == true
}
