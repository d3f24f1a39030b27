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
# Benchmark tools (scripts/bench installs them; the tests never need them).
VEGETA_VERSION="${VEGETA_VERSION:-v12.12.0}"
# opa-envoy-plugin tag, built against the OPA above (the same OPA engine as authz's).
PEER_VERSION="${PEER_VERSION:-v1.19.1-envoy}"
VEGETA_BIN="$AUTHZ_CACHE/vegeta-$VEGETA_VERSION/vegeta"
PEER_BIN="$AUTHZ_CACHE/opa-envoy-plugin-$PEER_VERSION-opa-$OPA_VERSION/opa-envoy-plugin"
export VEGETA_VERSION PEER_VERSION VEGETA_BIN PEER_BIN

log() { printf '\033[1m[%s]\033[0m %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Put the venv (python, envoy) and the cached OPA on PATH.
activate() {
  export PATH="$VENV/bin:$(dirname "$OPA_BIN"):$PATH"
}

# Validation tools for the infra tests (scripts/install-tools builds them once):
# promtool from Prometheus' Go module (module v0.3MM.P is Prometheus v3.MM.P), and
# composecheck (scripts/tools/composecheck, pinned by its go.sum), cached by content hash.
PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-v3.16.0}"
PROMTOOL_BIN="$AUTHZ_CACHE/promtool-$PROMETHEUS_VERSION/promtool"
COMPOSECHECK_HASH="$(cat "$ROOT"/scripts/tools/composecheck/{go.mod,go.sum,main.go} | sha256sum | cut -c1-16)"
COMPOSECHECK_BIN="$AUTHZ_CACHE/composecheck-$COMPOSECHECK_HASH/composecheck"
export PROMETHEUS_VERSION PROMTOOL_BIN COMPOSECHECK_BIN
# Regal, the Rego linter (scripts/test lints policy/, bench/peer/, infra/opa/system/ with
# .regal/config.yaml), built from its Go module with the OPA its go.mod names (v0.42.0:
# OPA v1.18.2, which parses every policy here; forced onto OPA v1.22.2 it does not compile:
# that OPA requires gobwas/glob v1.0.0, which lacks the glob.Glob type Regal uses).
REGAL_VERSION="${REGAL_VERSION:-v0.42.0}"
REGAL_BIN="${REGAL_BIN:-$AUTHZ_CACHE/regal-$REGAL_VERSION/regal}"
export REGAL_VERSION REGAL_BIN

# Build a Go program in a scratch module: `go install pkg@version` needs the module
# proxy's version list (refused for some modules) and refuses modules with replace
# directives; a build inside a module that requires the pinned versions needs neither.
#   go_build_tool OUT MAIN_PACKAGE LDFLAGS MODULE@VERSION...
# Returns 1 (after the build log's tail) when Go is missing or the build fails.
go_build_tool() {
  local out="$1" main="$2" ldflags="$3"; shift 3
  command -v go >/dev/null || { log "the Go toolchain is needed to build $(basename "$out")"; return 1; }
  local tmp; tmp="$(mktemp -d)"
  mkdir -p "$(dirname "$out")"
  if ! (
    cd "$tmp"
    go mod init build-tool >/dev/null 2>&1
    printf '//go:build tools\n\npackage tools\n\nimport _ "%s"\n' "$main" > tools.go
    go get "$@" >build.log 2>&1
    CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$out.tmp" "$main" >>build.log 2>&1
  ); then
    tail -5 "$tmp/build.log" >&2
    rm -rf "$tmp"
    rmdir "$(dirname "$out")" 2>/dev/null || true
    return 1
  fi
  mv "$out.tmp" "$out"
  rm -rf "$tmp"
}

# kustomize (infra/k8s overlays and components, rendered by tests/infra/test_k8s.py without
# a cluster), built from its Go module by scripts/install-tools. v5.8.2: the newest release
# whose go.mod this machine's Go (1.26) builds (v5.8.3 declares go 1.27.0).
KUSTOMIZE_VERSION="${KUSTOMIZE_VERSION:-v5.8.2}"
KUSTOMIZE_BIN="$AUTHZ_CACHE/kustomize-$KUSTOMIZE_VERSION/kustomize"
export KUSTOMIZE_VERSION KUSTOMIZE_BIN
# The null ext_authz server of the benchmark's "ceiling" setup (bench/ceiling: grpc-go and
# go-control-plane, pinned by its go.mod and go.sum), cached by content hash like
# composecheck; scripts/install-tools ceiling (run by scripts/bench) builds it.
# (A copy of scripts/ without bench/, as the script tests make, has no ceiling to hash.)
if [[ -d "$ROOT/bench/ceiling" ]]; then
  CEILING_HASH="$(cat "$ROOT"/bench/ceiling/{go.mod,go.sum,main.go} | sha256sum | cut -c1-16)"
else
  CEILING_HASH="absent"
fi
CEILING_BIN="$AUTHZ_CACHE/bench-ceiling-$CEILING_HASH/ceiling"
export CEILING_BIN
