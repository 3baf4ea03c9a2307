#!/usr/bin/env bash
# Deletes the namespaces test runs left on the test API server (`t-<hex>`:
# every Kubernetes test makes its own and deletes it, but a failed or
# killed test leaves it behind), and the injector tests' webhook
# registrations (`statefabric-injector-t-<hex>`; each selects only its own
# test's namespace, so one left behind gets in nobody's way), and the chart
# test's (`statefabric-injector`). The
# controller manager deletes the namespaces' objects. scripts/test.sh calls
# this after the suite; best effort.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=kubernetes.sh
. "$TESTENV_DIR/kubernetes.sh"

kube_api_ready 2>/dev/null || { log "kube-apiserver is not running: nothing to prune"; exit 0; }
kubectl=("$KUBE_TOOLS/kubectl" --kubeconfig "$KUBE_STATE/admin.kubeconfig")
mapfile -t hooks < <("${kubectl[@]}" get mutatingwebhookconfigurations -o name 2>/dev/null | grep -E '/statefabric-injector-t-[0-9a-f]{8,}$')
if (( ${#hooks[@]} )) && "${kubectl[@]}" delete "${hooks[@]}" >/dev/null 2>&1; then
  log "deleted ${#hooks[@]} test webhook registrations of earlier runs"
fi
# The chart test installs the chart (with failurePolicy Ignore) and
# uninstalls it; a killed run leaves the release and its webhook.
if "${kubectl[@]}" get mutatingwebhookconfiguration statefabric-injector >/dev/null 2>&1; then
  "${kubectl[@]}" delete mutatingwebhookconfiguration statefabric-injector >/dev/null 2>&1 \
    && log "deleted the chart test's webhook registration of an earlier run"
fi
mapfile -t left < <("${kubectl[@]}" get namespaces -o name 2>/dev/null | sed 's|^namespace/||' | grep -E '^t-[0-9a-f]{8,}$')
(( ${#left[@]} )) || exit 0
if "${kubectl[@]}" delete namespace --wait=false "${left[@]}" >/dev/null 2>&1; then
  log "deleted ${#left[@]} test namespaces of earlier runs"
else
  log "could not delete the test namespaces (${#left[@]})"
fi
