# The peer shim gives exactly the decision the gateway policy gives on authz's input.
package authz.gateway_peer_test

import data.authz.gateway
import data.authz.gateway_peer

keys := {crypto.sha256("k-user"): {"id": "key-user", "enabled": true, "role": "user", "rate_limit_tier": "unlimited"}}

http_request(headers) := {
	"method": "GET",
	"path": "/api/v1/items/1",
	"headers": object.union({"host": "gw", ":path": "/api/v1/items/1"}, headers),
}

# What the plugin passes: the raw headers, no input.credentials.
raw(headers) := {
	"attributes": {"request": {"http": http_request(headers)}},
	"parsed_path": ["api", "v1", "items", "1"],
	"parsed_query": {},
}

# What authz passes for the same request (docs/contract.md).
hashed(headers, credentials) := object.union(raw(headers), {"credentials": credentials})

same(raw_headers, authz_headers, credentials) if {
	peer := gateway_peer.decision with input as raw(raw_headers) with data.gateway.api_keys as keys
	want := gateway.decision with input as hashed(authz_headers, credentials) with data.gateway.api_keys as keys
	peer == want
}

d := crypto.sha256("k-user")

test_api_key if {
	same({"x-api-key": " k-user "}, {"x-api-key": concat("", ["sha256:", d])}, {"x-api-key": d})
	gateway_peer.decision.allowed with input as raw({"x-api-key": "k-user"}) with data.gateway.api_keys as keys
}

test_bearer if {
	same({"authorization": "Bearer  k-user"}, {"authorization": concat("", ["Bearer sha256:", d])}, {"authorization": d})
	gateway_peer.decision.allowed with input as raw({"authorization": "Bearer k-user"}) with data.gateway.api_keys as keys
}

test_unknown_key if {
	u := crypto.sha256("nope")
	same({"x-api-key": "nope"}, {"x-api-key": concat("", ["sha256:", u])}, {"x-api-key": u})
	gateway_peer.decision.authz.reason == "invalid_api_key" with input as raw({"x-api-key": "nope"})
		with data.gateway.api_keys as keys
}

test_missing_key if {
	same({}, {}, {})
	gateway_peer.decision.authz.reason == "missing_api_key" with input as raw({}) with data.gateway.api_keys as keys
}

test_forged_identity_header_removed if {
	same(
		{"x-api-key": "k-user", "x-authz-admin": "1"},
		{"x-api-key": concat("", ["sha256:", d]), "x-authz-admin": "1"},
		{"x-api-key": d},
	)
}
