#!/usr/bin/env bash
# Builds daprd (the Dapr sidecar) from the Go module proxy, once, into the
# tool cache outside the clone; prints the binary's path. Used by the peer
# benchmark (bench/dapr/run.sh); not part of the test suite.
#
# `go install github.com/dapr/dapr/cmd/daprd@…` is refused (the module has
# replace directives), so the module is downloaded, copied somewhere
# writable and built inside with -mod=mod. About 750 MB of modules and
# ~11 minutes on 2 cores the first time.
set -euo pipefail

version="${DAPR_VERSION:-1.18.2}"
cache="${STATEFABRIC_TOOLS:-$HOME/.cache/statefabric/tools}/daprd-$version"
binary="$cache/daprd"
if [[ -x "$binary" ]]; then
  echo "$binary"
  exit 0
fi
command -v go >/dev/null || { echo "build-daprd: Go is needed (testenv/up.sh installs it)" >&2; exit 1; }
mkdir -p "$cache"
src="$(go mod download -json "github.com/dapr/dapr@v$version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
work="$cache/src"
rm -rf "$work"
cp -r "$src" "$work"
chmod -R u+w "$work"
(
  cd "$work"
  CGO_ENABLED=0 GOFLAGS=-mod=mod nice go build -tags=allcomponents \
    -ldflags "-s -w -X github.com/dapr/dapr/pkg/buildinfo.version=$version" \
    -o "$binary.tmp" ./cmd/daprd >&2
)
mv "$binary.tmp" "$binary"
rm -rf "$work"
echo "$binary"
