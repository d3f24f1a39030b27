# Decision log masking (OPA evaluates data.system.log.mask for every decision log entry
# before it is written). authz already replaces credentials with SHA-256 digests before
# OPA sees them (docs/contract.md); request bodies (LLM prompts, uploads) and cookies
# are dropped from OPA's decision log as well.
# See https://www.openpolicyagent.org/docs/management-decision-logs#masking-sensitive-data
package system.log

mask contains "/input/attributes/request/http/body"

mask contains "/input/attributes/request/http/rawBody"

mask contains "/input/parsed_body"

mask contains "/input/attributes/request/http/headers/cookie"
