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
# Which hop of the egress Envoy asks (its route's context_extensions, never the client):
# "inner" is a request inside an intercepted CONNECT tunnel, whose x-sandbox-id Envoy set
# from the identity the CONNECT proved (any client-sent value removed first).
hop := object.get(input.attributes.contextExtensions, "hop", "")

connect if method == "CONNECT"

# Where the sandbox's identity comes from, first match wins: authz's preview; the tunnel
# (inner hop); the X-Sandbox-Id/X-Sandbox-Token headers; Proxy-Authorization: Basic
# base64(id:token) (authz decodes it into input.proxy_authorization, the token as its
# digest: docs/contract.md), which the standard HTTPS_PROXY/HTTP_PROXY settings send.
id_source := "preview" if {
	# Not redundant: a false sandbox_id falls through to the header.
	# regal ignore:redundant-existence-check
	input.preview.sandbox_id
} else := "tunnel" if {
	hop == "inner"
	headers[identity.id_header]
} else := "header" if {
	headers[identity.id_header]
} else := "proxy" if {
	input.proxy_authorization.user
}

sandbox_id := input.preview.sandbox_id if {
	id_source == "preview"
} else := headers[identity.id_header] if {
	id_source in {"tunnel", "header"}
} else := input.proxy_authorization.user if {
	id_source == "proxy"
}

sandbox := data.egress.sandboxes[sandbox_id]

token_digest := input.credentials[identity.token_header] if {
	id_source == "header"
} else := input.proxy_authorization.password_sha256 if {
	id_source == "proxy"
}

header_only if identity.mode == "header"

previewed if input.preview.sandbox_id == sandbox_id

token_ok if header_only

token_ok if previewed

# Proven by the CONNECT that opened the tunnel (checked with its token then).
token_ok if id_source == "tunnel"

token_ok if token_digest == sandbox.token_sha256

# A client speaking to the egress as a proxy (a CONNECT, Proxy-Authorization, or an
# absolute-form request to a service's real host) is answered as a proxy answers: 407
# with Proxy-Authenticate (RFC 9110 section 15.5.8), which is what makes a client send
# the credentials of its proxy URL.
proxy_style if connect

proxy_style if id_source == "proxy"

proxy_style if "proxy-authorization" in object.keys(input.credentials)

proxy_style if input.attributes.contextExtensions.proxy == "true"

auth_deny(reason, _) := lib.proxy_unauthorized(reason) if proxy_style

auth_deny(reason, presented) := lib.unauthorized(reason, presented) if not proxy_style

# A Proxy-Authorization that is not Basic base64(id:token) (authz could not decode it).
proxy_authorization_malformed if {
	"proxy-authorization" in object.keys(input.credentials)
	not input.proxy_authorization
}

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

# A tunnel's CONNECT names no service ("").
default identity_service := ""

identity_service := concat("", [service_name])

decision_identity := object.union(
	{"sandbox_id": sandbox_id, "service": identity_service, "tier": sandbox_tier},
	{"namespace": sandbox.namespace | is_string(sandbox.namespace)},
) if {
	token_ok
} else := {"sandbox_id": sandbox_id, "service": identity_service}

# One ordered chain: the first failing check names the deny, so it reads top to bottom.
# regal ignore:rule-length
verdict := auth_deny("invalid_proxy_authorization", true) if {
	not sandbox_id
	proxy_authorization_malformed
} else := auth_deny("missing_sandbox_id", false) if {
	not sandbox_id
} else := auth_deny("unknown_sandbox", true) if {
	not sandbox
} else := auth_deny("missing_sandbox_token", false) if {
	not header_only
	not previewed
	not token_ok
	not token_digest
} else := auth_deny("invalid_sandbox_token", true) if {
	not token_ok
} else := auth_deny("sandbox_disabled", true) if {
	not enabled
} else := lib.blocked_by(tunnel_blocked) if {
	tunnel_request
	tunnel_blocked
} else := tunnel_verdict if {
	tunnel_request
} else := lib.deny(403, "unknown_service") if {
	not service
} else := lib.blocked_by(blocked) if {
	blocked
} else := connect_allow if {
	# CONNECT to an intercepted service's host: the tunnel only opens; every request
	# inside it is decided on its own (hop inner), with its method and path.
	connect
	service_in_tier
} else := lib.deny(403, "service_not_allowed") if {
	connect
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

# -- CONNECT: intercepted services and policy-checked tunnels (issue 18) ---------------

# The CONNECT that opens an intercepted tunnel: no credential (nothing is forwarded: the
# requests inside are checked and get theirs), rate-limited per sandbox.
connect_allow := {
	"allowed": true,
	"authz": {
		"reason": "allowed",
		"source": allow_source,
		"rate_limit": {
			"tier": sandbox_tier,
			"key": concat(":", ["sandbox", sandbox_id, "connect"]),
			"requests_per_minute": requests_per_minute,
		},
		"identity": decision_identity,
	},
	"dynamic_metadata": {"sandbox_id": sandbox_id, "service": service_name, "tier": sandbox_tier},
}

# A CONNECT on the egress Envoy's catch-all tunnel route (every host:port that is not an
# intercepted service's host:443).
tunnel_request if {
	connect
	input.attributes.contextExtensions.tunnel == "true"
}

# A deny override that names no service blocks the sandbox's tunnels too.
tunnel_blocked := lib.first_override({o | some o in overrides; not o.match.service}, "deny")

tunnel_authority := lower(input.attributes.request.http.host)

# host:port, host a DNS name (letters, digits, '-', '_', '.'), port 1-5 digits.
tunnel_parts := regex.find_all_string_submatch_n(`^([a-z0-9_.-]{1,253}):([0-9]{1,5})$`, tunnel_authority, 1)[0]

tunnel_host := trim_suffix(tunnel_parts[1], ".")

tunnel_port := to_number(tunnel_parts[2])

tunnel_port_valid if {
	tunnel_port >= 1
	tunnel_port <= 65535
}

tunnel_labels := split(tunnel_host, ".")

# An IP literal in any spelling a resolver accepts (dotted, decimal 2130706433, hex
# 0x7f.1, octal): a DNS top-level label never starts with a digit.
tunnel_ip_literal if regex.match(`^[0-9]`, tunnel_labels[count(tunnel_labels) - 1])

# Names that mean this machine or a cloud's internal network whatever DNS says (RFC 6761
# localhost; .internal holds GCP's metadata.google.internal; .local is mDNS). authz also
# refuses any name that resolves to a non-public address.
tunnel_internal_name if tunnel_host == "localhost"

tunnel_internal_name if {
	some suffix in [".localhost", ".internal", ".local", ".home.arpa"]
	endswith(tunnel_host, suffix)
}

# Every configured service's host: reachable only intercepted (checked, credential
# injected), never through a plain tunnel, whatever a tier lists.
service_hosts contains lower(regex.replace(s.base_url, `^https?://([^/:]+).*$`, "$1")) if {
	some s in data.egress.services
}

# A tier's hosts: its own tunnel_hosts and a deployment's additions
# (data.egress.tunnel_hosts[<tier>], an overlay like the sandboxes).
tunnel_patterns contains p if some p in tier.tunnel_hosts

tunnel_patterns contains p if some p in data.egress.tunnel_hosts[sandbox_tier]

# "name" (port 443), "name:port", "*.domain" (any name under domain, not domain itself).
pattern_matches(p) if {
	not contains(p, ":")
	tunnel_port == 443
	name_matches(lower(p))
}

pattern_matches(p) if {
	[name, port] := split(p, ":")
	to_number(port) == tunnel_port
	name_matches(lower(name))
}

name_matches(name) if {
	not startswith(name, "*.")
	name == tunnel_host
}

name_matches(name) if {
	startswith(name, "*.")
	endswith(tunnel_host, substring(name, 1, -1))
}

tunnel_allowed if {
	some p in tunnel_patterns
	pattern_matches(p)
}

tunnel_destination := sprintf("%s:%d", [tunnel_host, tunnel_port])

tunnel_verdict := lib.deny(400, "invalid_tunnel_target") if {
	not tunnel_parts
} else := lib.deny(400, "invalid_tunnel_target") if {
	not tunnel_port_valid
} else := lib.deny(403, "ip_literal_not_allowed") if {
	tunnel_ip_literal
} else := lib.deny(403, "address_not_allowed") if {
	tunnel_internal_name
} else := lib.deny(403, "service_host_not_tunnelable") if {
	tunnel_host in service_hosts
} else := lib.deny(403, "tunnel_not_allowed") if {
	not tunnel_allowed
} else := tunnel_allow

# authz resolves authz.tunnel.host (refusing a non-public answer: address_not_allowed)
# and pins the checked address for Envoy (docs/contract.md).
tunnel_allow := {
	"allowed": true,
	"authz": {
		"reason": "allowed",
		"source": allow_source,
		"rate_limit": {
			"tier": sandbox_tier,
			"key": concat(":", ["sandbox", sandbox_id, "tunnel"]),
			"requests_per_minute": requests_per_minute,
		},
		"identity": object.union(decision_identity, {"destination": tunnel_destination}),
		"tunnel": {"host": tunnel_host, "port": tunnel_port},
	},
	"dynamic_metadata": {
		"sandbox_id": sandbox_id,
		"tier": sandbox_tier,
		"destination": tunnel_destination,
	},
}
