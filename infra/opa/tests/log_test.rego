# Decision-log masking of credential-carrying query strings (security review):
#   opa test infra/opa/system infra/opa/tests      (tests/infra/test_opa.py runs it)
package system.log_test

import data.system.log

event := {"input": {
	"attributes": {"request": {"http": {
		"path": "/api/v1/items?api_key=ak_live_SECRET",
		"headers": {":path": "/api/v1/items?api_key=ak_live_SECRET"},
	}}},
	"parsed_query": {"api_key": ["ak_live_SECRET"]},
}}

# A mask entry (a JSON pointer, or {"path": pointer, ...}) covering `location`.
covered(masks, location) if {
	some m in masks
	pointer := object.get({"m": m}, ["m", "path"], m)
	is_string(pointer)
	startswith(concat("", [location, "/"]), concat("", [pointer, "/"]))
}

test_query_credentials_are_masked if {
	masks := log.mask with input as event
	covered(masks, "/input/attributes/request/http/path")
	covered(masks, "/input/attributes/request/http/headers/:path")
	covered(masks, "/input/parsed_query/api_key")
}

# A bearer JWT reaches the policy in clear (docs/contract.md): never in the decision log.
jwt := "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoiYWRtaW4ifQ.c2ln"

jwt_event := {"input": {"attributes": {"request": {"http": {
	"headers": {"authorization": concat(" ", ["Bearer", jwt])},
	"headerMap": {"headers": [{"key": "Authorization", "rawValue": base64.encode(concat(" ", ["Bearer", jwt]))}]},
}}}}}

test_bearer_jwt_is_masked if {
	masks := log.mask with input as jwt_event
	covered(masks, "/input/attributes/request/http/headers/authorization")
	covered(masks, "/input/attributes/request/http/headerMap/headers/0/rawValue")
}

test_header_map_without_authorization_is_kept if {
	event := {"input": {"attributes": {"request": {"http": {"headerMap": {"headers": [{"key": "accept", "value": "*/*"}]}}}}}}
	masks := log.mask with input as event
	not covered(masks, "/input/attributes/request/http/headerMap/headers/0/value")
}

# A batch query (data.authz.batch.result) carries many inputs: each one is masked as a
# single decision's input is, at /input/inputs/<i>.
test_each_input_of_a_batch_query_is_masked if {
	batch := {"input": {"path": "authz/gateway/decision", "inputs": [
		{"attributes": {"request": {"http": {"path": "/a", "headers": {"x-request-id": "r"}}}}},
		jwt_event.input,
		event.input,
	]}}
	masks := log.mask with input as batch
	covered(masks, "/input/inputs/0/attributes/request/http/body")
	covered(masks, "/input/inputs/0/attributes/request/http/headers/cookie")
	covered(masks, "/input/inputs/1/attributes/request/http/headers/authorization")
	covered(masks, "/input/inputs/1/attributes/request/http/headerMap/headers/0/rawValue")
	covered(masks, "/input/inputs/2/attributes/request/http/path")
	covered(masks, "/input/inputs/2/parsed_query/api_key")
	not covered(masks, "/input/inputs/0/attributes/request/http/path")
	not covered(masks, "/input/inputs/0/attributes/request/http/headers/x-request-id")
}
