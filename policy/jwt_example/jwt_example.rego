# The OPA Envoy tutorial's JWT example
# (https://www.openpolicyagent.org/docs/envoy/tutorial-standalone-envoy), on authz: a
# bearer JWT whose `role` claim decides what the caller may do on /people. Guests and
# admins may GET /people and below; admins may POST /people, but not a person whose
# first name is their own (the token's `sub`, base64url, as in the tutorial).
#
# Query: data.authz.jwt_example.decision (the gateway's /people route has decision_path
# authz/jwt_example/decision and parse_body "true"). `allow` is the tutorial's rule; the
# decision is the plugin's forms of it: false, or an allow that keeps the token (a
# credential) from the upstream, which the tutorial's plain `true` would forward.
#
# A bearer JWT reaches the policy in clear (docs/contract.md), so io.jwt.decode_verify
# checks its signature, `exp` and `nbf`. The keys that sign tokens are data, never in the
# bundle: data.gateway.jwt_example.jwks, a JWKS of public keys (RFC 7517) that the
# deployment adds (the local stack: infra/demo/bundle-data; the e2e tests: their own).
# Without it every request is denied.
package authz.jwt_example

default decision := false

decision := {"allowed": true, "request_headers_to_remove": ["authorization"]} if allow

default allow := false

allow if {
	token.valid
	action_allowed
}

http_request := input.attributes.request.http

action_allowed if {
	http_request.method == "GET"
	token.payload.role in {"guest", "admin"}
	glob.match("/people*", ["/"], http_request.path)
}

action_allowed if {
	http_request.method == "POST"
	token.payload.role == "admin"
	glob.match("/people", ["/"], http_request.path)
	lower(input.parsed_body.firstname) != base64url.decode(token.payload.sub)
}

token := {"valid": valid, "payload": payload} if {
	[scheme, encoded] := split(http_request.headers.authorization, " ")
	lower(scheme) == "bearer"
	[valid, _, payload] := io.jwt.decode_verify(encoded, {"cert": json.marshal(data.gateway.jwt_example.jwks)})
}
