# Tests for infra/opa/system (OPA's API authorization and decision-log masking):
#   opa test infra/opa/system infra/opa/tests      (tests/infra/test_opa.py runs it)
package system.authz_test

import data.system.authz
import data.system.log

token := "tok_0123456789abcdef0123456789abcdef"

runtime := {"env": {"AUTHZ_OPA_TOKEN": token}}

allowed(method, path, identity) if {
	authz.allow with input as {"method": method, "path": path, "identity": identity}
		with opa.runtime as runtime
}

test_probes_and_metrics_need_no_token if {
	allowed("GET", ["health"], null)
	allowed("GET", ["metrics"], null)
}

test_authz_decision_paths if {
	allowed("POST", ["v1", "data", "authz", "gateway", "decision"], token)
	allowed("POST", ["v1", "data", "authz", "egress", "decision"], token)
	allowed("POST", ["v1", "data", "authz", "batch", "result"], token)
	allowed("POST", ["v1", "data", "authz", "meta", "live"], token)
	allowed("POST", ["v1", "data", "authz", "meta", "warnings"], token)
}

test_decisions_need_the_token if {
	not allowed("POST", ["v1", "data", "authz", "batch", "result"], null)
	not allowed("POST", ["v1", "data", "authz", "gateway", "decision"], null)
	not allowed("POST", ["v1", "data", "authz", "gateway", "decision"], "wrong")
	not allowed("POST", ["v1", "data", "authz", "gateway", "decision"], concat("", [token, "x"]))
}

test_no_dumping_data_or_policies if {
	not allowed("GET", ["v1", "data"], token)
	not allowed("POST", ["v1", "data"], token)
	not allowed("GET", ["v1", "data", "gateway", "api_keys"], token)
	not allowed("POST", ["v1", "data", "authz"], token)
	not allowed("POST", ["v1", "data", "authz", "gateway"], token)
	not allowed("GET", ["v1", "policies"], token)
	not allowed("POST", ["v1", "query"], token)
	not allowed("POST", ["v1", "compile"], token)
	not allowed("GET", ["v1", "config"], token)
	not allowed("GET", ["v1", "status"], token)
	not allowed("GET", [""], token)
}

test_no_writes_outside_overrides if {
	not allowed("PUT", ["v1", "data", "gateway", "api_keys"], token)
	not allowed("PATCH", ["v1", "data", "authz"], token)
	not allowed("DELETE", ["v1", "data", "egress"], token)
	not allowed("PUT", ["v1", "policies", "x"], token)
	not allowed("PATCH", ["v1", "data", "overrides", "x"], token)
}

test_overrides_for_authz_only if {
	allowed("PUT", ["v1", "data", "overrides"], token)
	allowed("PUT", ["v1", "data", "overrides", "gateway", "key-a"], token)
	allowed("DELETE", ["v1", "data", "overrides", "gateway", "key-a"], token)
	allowed("GET", ["v1", "data", "overrides"], token)
	not allowed("PUT", ["v1", "data", "overrides", "gateway", "key-a"], null)
	not allowed("DELETE", ["v1", "data", "overrides"], "wrong")
	not allowed("PUT", ["v1", "data", "overridesx"], token)
}

test_short_or_missing_token_authorizes_nobody if {
	not authz.allow with input as {"method": "POST", "path": ["v1", "data", "authz", "gateway", "decision"], "identity": "short"}
		with opa.runtime as {"env": {"AUTHZ_OPA_TOKEN": "short"}}
	not authz.allow with input as {"method": "POST", "path": ["v1", "data", "authz", "gateway", "decision"], "identity": ""}
		with opa.runtime as {"env": {}}
}

test_decision_log_masks_bodies_and_cookies if {
	"/input/attributes/request/http/body" in log.mask
	"/input/attributes/request/http/rawBody" in log.mask
	"/input/parsed_body" in log.mask
	"/input/attributes/request/http/headers/cookie" in log.mask
}
