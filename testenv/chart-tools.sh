# The chart's tools, sourced by testenv/up.sh: helm, and the CustomResource-
# Definitions of the operators the chart's optional parts are written for
# (KEDA, prometheus-operator, CloudNativePG, cert-manager), so the rendered
# chart can be dry-run against the test API server with those kinds known.
#
# helm and those CRDs come from the Go module proxy (no other registry serves
# them here), once per version, into the tools cache outside the clone.
# Strimzi's and Litmus' CRDs are served by no registry: the project keeps
# copies under k8s/third-party/crds/ (origin and licence in its README).
# shellcheck shell=bash

HELM=$TOOLS/helm-v$HELM_VERSION/helm
THIRD_PARTY_CRDS=$TOOLS/crds

build_helm() {
  [[ -x $HELM ]] && return 0
  command -v go >/dev/null || die "building helm $HELM_VERSION needs Go on PATH"
  local started=$SECONDS buildlog=$LOGS/helm-build.log
  log "building helm $HELM_VERSION from the Go module proxy (about 2 minutes)"
  mkdir -p "$(dirname "$HELM")"
  GOBIN=$(dirname "$HELM") go install -trimpath -ldflags '-s -w' \
    "helm.sh/helm/v4/cmd/helm@v$HELM_VERSION" >"$buildlog" 2>&1 \
    || die "building helm failed; see $buildlog"
  log "built helm in $(( SECONDS - started ))s"
}

# crds_from_module NAME MODULE@VERSION SUBDIR: the module's CRD files, copied
# into $THIRD_PARTY_CRDS/NAME (one directory per operator and version).
crds_from_module() {
  local name=$1 module=$2 subdir=$3 target=$THIRD_PARTY_CRDS/$1
  [[ -f $target/.complete ]] && return 0
  local dir
  dir=$(GOFLAGS=-mod=mod go mod download -json "$module" 2>>"$LOGS/crds-download.log" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])') \
    || die "downloading $module failed; see $LOGS/crds-download.log"
  rm -rf "$target"
  mkdir -p "$target"
  cp "$dir/$subdir"/*.yaml "$target/"
  chmod -R u+w "$target"
  touch "$target/.complete"
}

fetch_third_party_crds() {
  crds_from_module keda-$KEDA_VERSION "github.com/kedacore/keda/v2@v$KEDA_VERSION" config/crd/bases
  crds_from_module prometheus-operator-$PROMETHEUS_OPERATOR_VERSION \
    "github.com/prometheus-operator/prometheus-operator@v$PROMETHEUS_OPERATOR_VERSION" example/prometheus-operator-crd
  crds_from_module cnpg-$CNPG_VERSION "github.com/cloudnative-pg/cloudnative-pg@v$CNPG_VERSION" config/crd/bases
  crds_from_module cert-manager-$CERT_MANAGER_VERSION \
    "github.com/cert-manager/cert-manager@v$CERT_MANAGER_VERSION" deploy/crds
}

prepare_chart_tools() {
  build_helm
  fetch_third_party_crds
}
