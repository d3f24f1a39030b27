# Benchmark only (scripts/bench overlays it on its bundles; never in a shipped bundle).
#
# The decision opa-envoy-plugin evaluates in the benchmark's "peer" setup. authz hashes
# credential headers before OPA sees them (docs/contract.md: digests in input.credentials,
# masked header values); the plugin passes the request's headers as they are. This shim
# adds the credential digests authz would add (input.credentials), hashing in Rego
# (crypto.sha256), and evaluates the unchanged gateway policy: both setups run the same
# policy and data, and the peer pays for the hashing inside its decision, as authz does.
package authz.gateway_peer

import data.authz.gateway

# authz's default AUTHZ_CREDENTIAL_HEADERS.
credential_headers := {"x-api-key", "authorization", "proxy-authorization", "x-sandbox-token"}

schemed_headers := {"authorization", "proxy-authorization"}

# authz.core.input._SCHEME: "<scheme> <credentials>" (RFC 9110 section 11.4).
scheme_pattern := "^([!#$%&'*+.^_`|~0-9A-Za-z-]+) +(\\S.*)$"

# header name -> hex digest, as authz.core.input.mask_credential: of the credentials after
# the scheme for a schemed authorization header, else of the whole trimmed value.
credentials[name] := digest(name, trim_space(value)) if {
	some name in credential_headers
	value := input.attributes.request.http.headers[name]
}

digest(name, value) := crypto.sha256(trim_space(m[2])) if {
	name in schemed_headers
	m := regex.find_all_string_submatch_n(scheme_pattern, value, 1)[0]
} else := crypto.sha256(value)

# Only input.credentials is added: header values stay as the plugin passes them. authz
# would also mask them ("sha256:<hex>", keeping an Authorization scheme), which changes no
# decision of the gateway policy (it reads only the scheme; gateway_peer_test.rego checks
# the decisions are the same) and would cost the peer a copy of the whole input.
# METADATA
# entrypoint: true
decision := d if {
	d := gateway.decision with input.credentials as credentials
}
