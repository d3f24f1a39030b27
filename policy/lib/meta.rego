# Operational warnings the active bundle wants an operator to see. authz evaluates
# data.authz.meta.warnings whenever a new bundle revision activates (and at startup) and
# logs each one at WARNING level; not more often, as it walks every key.
package authz.meta

# authz probes this every second (with provenance) for the active bundle revision: a
# constant, so the probe costs OPA next to nothing.
# METADATA
# entrypoint: true
live := true

# The policies' declared cache keys, by decision path (docs/contract.md, "Declared cache
# keys"): authz reads this once per activation and keys its decision cache for each path
# on exactly the input fields its policy declares. A path not listed keys on the whole
# input.
# METADATA
# entrypoint: true
cache_keys := {
	"authz/gateway/decision": data.authz.gateway.cache_key,
	"authz/egress/decision": data.authz.egress.cache_key,
}

# An unexpired TTL override (data.overrides, pushed by authz) naming a key, sandbox or
# service the bundle does not define: it does nothing now, and would apply to whatever
# later takes that id. An allow for a sandbox without a service is ignored by the egress
# policy (authz's admin API refuses one; an older overrides file may hold one).
live_overrides[id] := o if {
	some id, o in data.overrides
	time.now_ns() < o.expires_at_ns
}

gateway_key_ids contains key.id if some key in data.gateway.api_keys

# METADATA
# entrypoint: true
warnings contains msg if {
	data.egress.identity.mode == "header"
	msg := "egress sandbox identity is header-only: x-sandbox-token is not checked (INSECURE; trusted networks only)"
}

warnings contains msg if {
	mode := data.egress.identity.mode
	not mode in {"token", "header"}
	msg := sprintf("egress identity mode %q is unknown; sandbox tokens are required", [mode])
}

# A key or sandbox naming a namespace the data does not define: it gets no defaults, so
# a key without its own role or tier is denied everything.
warnings contains msg if {
	some key in data.gateway.api_keys
	key.namespace
	not data.gateway.namespaces[key.namespace]
	msg := sprintf("api key %q names namespace %q, which data.gateway.namespaces does not define", [key.id, key.namespace])
}

warnings contains msg if {
	some id, sandbox in data.egress.sandboxes
	sandbox.namespace
	not data.egress.namespaces[sandbox.namespace]
	msg := sprintf("sandbox %q names namespace %q, which data.egress.namespaces does not define", [id, sandbox.namespace])
}

warnings contains msg if {
	some id, o in live_overrides
	key_id := o.match.key_id
	not gateway_key_ids[key_id]
	msg := sprintf("override %q names api key %q, which data.gateway.api_keys does not define", [id, key_id])
}

warnings contains msg if {
	some id, o in live_overrides
	sandbox_id := o.match.sandbox_id
	not data.egress.sandboxes[sandbox_id]
	msg := sprintf("override %q names sandbox %q, which data.egress.sandboxes does not define", [id, sandbox_id])
}

warnings contains msg if {
	some id, o in live_overrides
	service := o.match.service
	not data.egress.services[service]
	msg := sprintf("override %q names service %q, which data.egress.services does not define", [id, service])
}

warnings contains msg if {
	some id, o in live_overrides
	o.effect == "allow"
	sandbox_id := o.match.sandbox_id
	not o.match.service
	msg := sprintf(
		"override %q allows sandbox %q without naming a service: the egress policy ignores it",
		[id, sandbox_id],
	)
}
