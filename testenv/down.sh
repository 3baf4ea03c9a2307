#!/usr/bin/env bash
# Stops every service testenv/up.sh started. With --purge, also deletes their
# data: databases, topics, connectors, registry subjects, the cluster's
# objects and certificates, logs — what a new user's machine does not have.
# Installed packages, fetched jars and built tools (Kubernetes, in
# $STATEFABRIC_TOOLS_DIR) are kept, so the next up.sh is fast.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=kubernetes.sh
. "$TESTENV_DIR/kubernetes.sh"

[[ -d $STATE ]] || { log "nothing to stop ($STATE does not exist)"; exit 0; }

stop_kubernetes
stop_pid connect
stop_pid registry
stop_pid kafka
IFS=, read -r -a ports <<< "$REDIS_CLUSTER_PORTS"
for p in "$REDIS_PORT" "${ports[@]}"; do
  if redis-cli -p "$p" ping >/dev/null 2>&1; then
    redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true
    log "stopped redis $p"
  fi
done
if [[ -f $STATE/postgres/data/postmaster.pid ]]; then
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$STATE/postgres/data" -m fast -w stop >/dev/null && log "stopped Postgres"
fi

if [[ ${1:-} == --purge ]]; then
  rm -rf "$STATE/postgres" "$STATE/redis" "$STATE/kafka" "$STATE/kube" "$STATE/logs" "$STATE"/*.pid "$STATE"/*.args "$STATE/env.sh"
  log "purged service data under $STATE (jars and built tools kept)"
fi
