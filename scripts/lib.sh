# shellcheck shell=bash
# Shared settings for the project's scripts. Source it; do not run it.
#
# Pinned versions and cache locations live here only, so every script agrees.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export ROOT
OPA_VERSION="${OPA_VERSION:-v1.22.2}"
# Binaries built from source are cached outside the checkout so a fresh clone on
# the same machine skips the build; the version is part of the path.
AUTHZ_CACHE="${AUTHZ_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/authz}"
OPA_BIN="$AUTHZ_CACHE/opa-$OPA_VERSION/opa"
VENV="${AUTHZ_VENV:-$ROOT/.venv}"
export OPA_VERSION AUTHZ_CACHE OPA_BIN VENV

log() { printf '\033[1m[%s]\033[0m %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Put the venv (python, envoy) and the cached OPA on PATH.
activate() {
  export PATH="$VENV/bin:$(dirname "$OPA_BIN"):$PATH"
}
