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
