# Tests of the OPA Envoy tutorial's JWT example (jwt_example.rego): the tutorial's cases,
# with tokens signed here by a test-only key (its public half is the test JWKS).
package authz.jwt_example_test

import data.authz.jwt_example

# Test-only ES256 key: it signs nothing outside these tests.
signing_key := {
	"kty": "EC", "crv": "P-256",
	"x": "mN5Y_nwWUbzxyGz4pIOrOvzQosmoyWAr1CQv2DLukYM",
	"y": "7FA2sJuD2aQKpHqeOrfqDvriPr22f35E7B5pziq8bUc",
	"d": "AdHFfa6clp4TEa9YNP2hDRH5CS2qV0OcqRn4Pgivqro",
}

jwks := {"keys": [object.remove(signing_key, {"d"})]}

now_s := time.now_ns() / 1000000000

# "YWxpY2U=" is base64url("alice"), the tutorial's sub for its admin token.
token(role, exp) := io.jwt.encode_sign(
	{"typ": "JWT", "alg": "ES256"},
	{"role": role, "sub": "YWxpY2U=", "nbf": now_s - 60, "exp": exp},
	signing_key,
)

valid(role) := token(role, now_s + 3600)

request(method, path, jwt, body) := {
	"attributes": {"request": {"http": {
		"method": method, "path": path,
		"headers": {"authorization": concat(" ", ["Bearer", jwt])},
	}}},
	"parsed_body": body,
}

decision(method, path, jwt, body) := result if {
	result := jwt_example.decision with input as request(method, path, jwt, body)
		with data.gateway.jwt_example.jwks as jwks
}

allowed(method, path, jwt, body) if decision(method, path, jwt, body).allowed

test_an_allow_keeps_the_token_from_the_upstream if {
	decision("GET", "/people", valid("guest"), null).request_headers_to_remove == ["authorization"]
	decision("GET", "/people", valid("intruder"), null) == false
}

test_guest_and_admin_may_get_people if {
	allowed("GET", "/people", valid("guest"), null)
	allowed("GET", "/people", valid("admin"), null)

	# The tutorial's glob: "*" stops at "/", so only /people itself and its siblings.
	not allowed("GET", "/people/42", valid("admin"), null)
}

test_only_admin_may_post_people if {
	allowed("POST", "/people", valid("admin"), {"firstname": "Charlie"})
	not allowed("POST", "/people", valid("guest"), {"firstname": "Charlie"})
}

test_admin_may_not_post_their_own_name if {
	not allowed("POST", "/people", valid("admin"), {"firstname": "Alice"})
}

test_other_paths_methods_and_roles_are_denied if {
	not allowed("GET", "/admin", valid("admin"), null)
	not allowed("DELETE", "/people", valid("admin"), null)
	not allowed("GET", "/people", valid("intruder"), null)
}

test_expired_forged_or_hashed_tokens_are_denied if {
	not allowed("GET", "/people", token("guest", now_s - 10), null)
	forged := io.jwt.encode_sign(
		{"typ": "JWT", "alg": "HS256"},
		{"role": "admin", "exp": now_s + 3600},
		{"kty": "oct", "k": "c2VjcmV0"},
	)
	not allowed("GET", "/people", forged, null)
	not allowed("GET", "/people", concat("", ["sha256:", crypto.sha256("x")]), null)
}

test_without_the_deployment_keys_everything_is_denied if {
	jwt_example.decision == false with input as request("GET", "/people", valid("admin"), null)
}
