#!/usr/bin/env bash
# Envoy for Compose, draining its listeners on SIGTERM (`docker compose stop|down|up` after a
# change) before it exits. Envoy alone closes its listeners at once on SIGTERM; a graceful
# drain has to be asked of its admin API first ("Draining",
# https://www.envoyproxy.io/docs/envoy/latest/intro/arch_overview/operations/draining):
#   1. SIGTERM arrives: POST /drain_listeners?graceful to the admin API (127.0.0.1 only);
#      with --drain-strategy immediate every response from then on says `Connection: close`
#      (HTTP/2: GOAWAY), so clients move to another proxy while in-flight requests finish;
#   2. after ENVOY_DRAIN_S seconds (Envoy's --drain-time-s too) Envoy gets the SIGTERM.
# Kubernetes does the same with a preStop hook (infra/k8s/base/{gateway,egress}.yaml).
# Compose's stop_grace_period must exceed ENVOY_DRAIN_S.
#
# Usage: drain-on-term.sh <envoy arguments>
#   ENVOY_DRAIN_S           drain time in seconds (default 15)
#   ENVOY_DRAIN_ADMIN_PORT  the admin API's port (default 9900, authz/tools/deploy.py)
#   ENVOY_LAUNCHER          what starts envoy (default the image's /docker-entrypoint.sh,
#                           which drops to the envoy user; empty: run envoy directly)
set -u
drain_s="${ENVOY_DRAIN_S:-15}"
admin_port="${ENVOY_DRAIN_ADMIN_PORT:-9900}"
launcher="${ENVOY_LAUNCHER-/docker-entrypoint.sh}"

# shellcheck disable=SC2086  # an empty launcher must vanish
$launcher envoy "$@" --drain-time-s "$drain_s" --drain-strategy immediate &
pid=$!

drain() {
  if exec 3<>"/dev/tcp/127.0.0.1/$admin_port"; then
    printf 'POST /drain_listeners?graceful HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' >&3
    read -r -t 5 _ <&3  # the status line: Envoy has taken the request
    exec 3>&-
  fi
  sleep "$drain_s"
  kill -TERM "$pid" 2>/dev/null
}
trap drain TERM INT

status=0
# `wait` returns early when a trapped signal arrives: wait again until Envoy has exited.
while kill -0 "$pid" 2>/dev/null; do
  wait "$pid"
  status=$?
done
exit "$status"
