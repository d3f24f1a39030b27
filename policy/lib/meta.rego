# Operational warnings the active bundle wants an operator to see. authz evaluates
# data.authz.meta.warnings whenever a new bundle revision activates (and at startup) and
# logs each one at WARNING level.
package authz.meta

warnings contains msg if {
	data.egress.identity.mode == "header"
	msg := "egress sandbox identity is header-only: x-sandbox-token is not checked (INSECURE; trusted networks only)"
}

warnings contains msg if {
	mode := data.egress.identity.mode
	not mode in {"token", "header"}
	msg := sprintf("egress identity mode %q is unknown; sandbox tokens are required", [mode])
}
