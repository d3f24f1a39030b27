# Operational warnings the active bundle wants an operator to see. authz evaluates
# data.authz.meta.warnings whenever a new bundle revision activates (and at startup) and
# logs each one at WARNING level; not more often, as it walks every key.
package authz.meta

# authz probes this every second (with provenance) for the active bundle revision: a
# constant, so the probe costs OPA next to nothing.
live := true

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
