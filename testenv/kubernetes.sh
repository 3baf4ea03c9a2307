# A real Kubernetes control plane for the tests, sourced by testenv/up.sh:
# etcd (Debian's etcd-server), kube-apiserver, kube-controller-manager and a
# kubectl of the same version, all on loopback, with their own CA, RBAC and
# the admission plugins a real cluster runs. There is no kubelet and no
# scheduler: pods stay Pending, and tests that must show a pod spec runs
# start its process themselves (the pod runner in tests/src/kube.rs).
#
# No registry serves Kubernetes' server binaries, so they are built from the
# k8s.io/kubernetes module on the Go module proxy, once per version, into a
# cache outside the clone ($STATEFABRIC_TOOLS_DIR), as the Rust target dir is.
# The module cannot be built as published (its go.mod points `replace`s at a
# staging/ tree the zip leaves out), so the build works on a copy whose
# go.mod requires the published k8s.io/* modules of the same minor version.
# shellcheck shell=bash

TOOLS=${STATEFABRIC_TOOLS_DIR:-$HOME/.cache/statefabric/tools}
KUBE_TOOLS=$TOOLS/kubernetes-v$KUBE_VERSION
KUBE_STATE=$STATE/kube
KUBE_BINARIES=(kube-apiserver kube-controller-manager kubectl)

kube_tools_built() {
  local b
  for b in "${KUBE_BINARIES[@]}"; do [[ -x $KUBE_TOOLS/$b ]] || return 1; done
}

build_kube_tools() {
  kube_tools_built && return 0
  command -v go >/dev/null || die "building Kubernetes $KUBE_VERSION needs Go (1.25 or newer) on PATH"
  local started=$SECONDS src=$TOOLS/src/kubernetes-v$KUBE_VERSION buildlog=$LOGS/kube-build.log
  log "building Kubernetes $KUBE_VERSION (kube-apiserver, kube-controller-manager, kubectl) from the Go module proxy; the first build takes about 12 minutes"
  mkdir -p "$TOOLS/src" "$KUBE_TOOLS"
  if [[ ! -f $src/.prepared ]]; then
    local dir
    dir=$(GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@v$KUBE_VERSION" 2>>"$buildlog" \
      | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])') \
      || die "downloading k8s.io/kubernetes@v$KUBE_VERSION failed; see $buildlog"
    rm -rf "$src"
    cp -r "$dir" "$src"
    chmod -R u+w "$src"
    rm -rf "$src/vendor" "$src"/go.work*
    # The published staging modules carry the same minor as the release:
    # k8s.io/api v0.36.3 belongs to Kubernetes v1.36.3.
    python3 - "$src/go.mod" "0.${KUBE_VERSION#*.}" <<'PY'
import re, sys
path, staging = sys.argv[1], sys.argv[2]
text = open(path).read()
text = re.sub(r'\nreplace \((?:.|\n)*?\n\)\n', '\n', text)
# Only the bare v0.0.0 of a staging module, not a pseudo-version.
text = re.sub(r'(k8s\.io/[\w.-]+) v0\.0\.0(?=\s)', rf'\1 v{staging}', text)
open(path, 'w').write(text)
PY
    touch "$src/.prepared"
  fi
  local version_flags="-s -w -X k8s.io/component-base/version.gitVersion=v$KUBE_VERSION"
  version_flags+=" -X k8s.io/component-base/version.gitMajor=${KUBE_VERSION%%.*}"
  version_flags+=" -X k8s.io/component-base/version.gitMinor=$(cut -d. -f2 <<<"$KUBE_VERSION")"
  version_flags+=" -X k8s.io/client-go/pkg/version.gitVersion=v$KUBE_VERSION"
  local b
  for b in "${KUBE_BINARIES[@]}"; do
    [[ -x $KUBE_TOOLS/$b ]] && continue
    (cd "$src" && GOWORK=off GOFLAGS=-mod=mod go build -trimpath -ldflags "$version_flags" \
      -o "$KUBE_TOOLS/$b.partial" "./cmd/$b") >>"$buildlog" 2>&1 \
      || die "building $b failed; see $buildlog"
    mv "$KUBE_TOOLS/$b.partial" "$KUBE_TOOLS/$b"
  done
  log "built Kubernetes $KUBE_VERSION in $(( SECONDS - started ))s into $KUBE_TOOLS"
}

# ---------------------------------------------------------------- certificates
# cert NAME SUBJECT [EXTENSIONS]: a key and a certificate signed by the test
# CA, made once (the data directory's etcd holds objects that refer to them).
kube_cert() {
  local name=$1 subject=$2 ext=${3:-} dir=$KUBE_STATE/pki
  [[ -f $dir/$name.crt ]] && return 0
  openssl req -new -newkey rsa:2048 -nodes -keyout "$dir/$name.key" -subj "$subject" \
    -out "$dir/$name.csr" 2>/dev/null
  local extfile=$dir/$name.ext
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n%s\n' "$ext" > "$extfile"
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$extfile" -out "$dir/$name.crt" 2>/dev/null
  rm -f "$dir/$name.csr" "$extfile"
}

kube_pki() {
  local dir=$KUBE_STATE/pki
  mkdir -p "$dir"
  if [[ ! -f $dir/ca.crt ]]; then
    openssl req -x509 -new -newkey rsa:2048 -nodes -keyout "$dir/ca.key" -days 3650 -sha256 \
      -subj "/CN=statefabric-test-kubernetes-ca" -out "$dir/ca.crt" 2>/dev/null
  fi
  kube_cert apiserver "/CN=kube-apiserver" \
    "extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
  # system:masters is the admin group the API server trusts without RBAC rules.
  kube_cert admin "/O=system:masters/CN=statefabric-test-admin" "extendedKeyUsage=clientAuth"
  kube_cert controller-manager "/CN=system:kube-controller-manager" "extendedKeyUsage=clientAuth"
  # The control plane's mesh configuration service, as the tests run it.
  kube_cert mesh "/CN=statefabric-control-plane" "extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost"
  # The key pair that signs and verifies ServiceAccount tokens.
  if [[ ! -f $dir/sa.key ]]; then
    openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
    openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
  fi
}

# kubeconfig FILE USER CERT: a kubeconfig for the test API server.
kube_kubeconfig() {
  local file=$1 user=$2 cert=$3 dir=$KUBE_STATE/pki
  cat > "$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: statefabric-test
  cluster:
    server: https://127.0.0.1:$KUBE_API_PORT
    certificate-authority: $dir/ca.crt
users:
- name: $user
  user:
    client-certificate: $dir/$cert.crt
    client-key: $dir/$cert.key
contexts:
- name: statefabric-test
  context: {cluster: statefabric-test, user: $user}
current-context: statefabric-test
EOF
}

# ---------------------------------------------------------------- processes
etcd_ready() { curl -fsS "http://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"'; }

start_etcd() {
  local cmd=(etcd --name statefabric-test --data-dir "$KUBE_STATE/etcd"
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT"
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT"
    --initial-cluster "statefabric-test=http://127.0.0.1:$ETCD_PEER_PORT"
    --quota-backend-bytes 2147483648 --snapshot-count 10000)
  process_current etcd "${cmd[@]}" && return 0
  # etcd keeps its peer address in its data: data made on other ports (an
  # earlier services.env) is deleted; the cluster's objects are disposable.
  local layout=$ETCD_PORT,$ETCD_PEER_PORT
  if [[ -d $KUBE_STATE/etcd && $(cat "$KUBE_STATE/etcd.layout" 2>/dev/null) != "$layout" ]]; then
    log "deleting etcd's data: it was made for other ports"
    rm -rf "$KUBE_STATE/etcd"
  fi
  echo "$layout" > "$KUBE_STATE/etcd.layout"
  ensure_ports_free etcd "$ETCD_PORT" "$ETCD_PEER_PORT"
  log "starting etcd on $ETCD_PORT"
  start_process etcd "$LOGS/etcd.log" "${cmd[@]}"
}

kube_api_ready() {
  local dir=$KUBE_STATE/pki
  curl -fsS --cacert "$dir/ca.crt" --cert "$dir/admin.crt" --key "$dir/admin.key" \
    "https://127.0.0.1:$KUBE_API_PORT/readyz" | grep -q '^ok$'
}

start_kube_apiserver() {
  local dir=$KUBE_STATE/pki
  local cmd=("$KUBE_TOOLS/kube-apiserver"
    --etcd-servers "http://127.0.0.1:$ETCD_PORT"
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$KUBE_API_PORT"
    --tls-cert-file "$dir/apiserver.crt" --tls-private-key-file "$dir/apiserver.key"
    --client-ca-file "$dir/ca.crt"
    --service-account-key-file "$dir/sa.pub" --service-account-signing-key-file "$dir/sa.key"
    --service-account-issuer https://kubernetes.default.svc
    --api-audiences https://kubernetes.default.svc,statefabric
    --service-cluster-ip-range 10.96.0.0/16
    --authorization-mode RBAC
    --enable-admission-plugins NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultTolerationSeconds,ResourceQuota,PodSecurity,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy
    --allow-privileged=true --profiling=false --v=1)
  process_current kube-apiserver "${cmd[@]}" && return 0
  ensure_ports_free kube-apiserver "$KUBE_API_PORT"
  log "starting kube-apiserver $KUBE_VERSION on $KUBE_API_PORT"
  start_process kube-apiserver "$LOGS/kube-apiserver.log" "${cmd[@]}"
}

start_kube_controller_manager() {
  local dir=$KUBE_STATE/pki
  # Deployments → ReplicaSets → Pods, default ServiceAccounts, namespace
  # deletion, garbage collection; each controller under its own
  # ServiceAccount, as in a real cluster.
  local cmd=("$KUBE_TOOLS/kube-controller-manager"
    --kubeconfig "$KUBE_STATE/controller-manager.kubeconfig"
    --authentication-kubeconfig "$KUBE_STATE/controller-manager.kubeconfig"
    --authorization-kubeconfig "$KUBE_STATE/controller-manager.kubeconfig"
    --bind-address 127.0.0.1 --secure-port "$KUBE_CONTROLLER_MANAGER_PORT"
    --use-service-account-credentials=true
    --service-account-private-key-file "$dir/sa.key" --root-ca-file "$dir/ca.crt"
    --leader-elect=false --controllers '*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service-lb-controller,-route'
    --v=1)
  process_current kube-controller-manager "${cmd[@]}" && return 0
  ensure_ports_free kube-controller-manager "$KUBE_CONTROLLER_MANAGER_PORT"
  log "starting kube-controller-manager"
  start_process kube-controller-manager "$LOGS/kube-controller-manager.log" "${cmd[@]}"
}

kube_default_sa() {
  "$KUBE_TOOLS/kubectl" --kubeconfig "$KUBE_STATE/admin.kubeconfig" -n default get serviceaccount default
}

start_kubernetes() {
  build_kube_tools
  mkdir -p "$KUBE_STATE"
  kube_pki
  kube_kubeconfig "$KUBE_STATE/admin.kubeconfig" statefabric-test-admin admin
  kube_kubeconfig "$KUBE_STATE/controller-manager.kubeconfig" system:kube-controller-manager controller-manager
  start_etcd
  wait_for "etcd" 60 etcd_ready
  start_kube_apiserver
  wait_for "kube-apiserver" 120 kube_api_ready
  start_kube_controller_manager
  # The controller manager is up once it has made the default ServiceAccount.
  wait_for "kube-controller-manager" 120 kube_default_sa
}

stop_kubernetes() {
  stop_pid kube-controller-manager
  stop_pid kube-apiserver
  stop_pid etcd
}
