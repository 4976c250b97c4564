#!/usr/bin/env bash
# build.sh — build etcd, kube-apiserver and kube-controller-manager for the pinned release into
# $TANDEM_CACHE/k8s-v<release>-go<go version>/bin, once per machine. Prints that bin directory.
#
# Static (CGO_ENABLED=0) like upstream's release binaries, with the version stamped where
# upstream's hack/lib/version.sh stamps it, so /version reports the real release (kubectl's
# version dispatcher and skew checks read it).
set -euo pipefail
cd "$(dirname "$0")"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
KV=$(cat KUBE_VERSION)
MINOR=$(echo "$KV" | cut -d. -f2)
GOV=$(go env GOVERSION)
CACHE=${TANDEM_CACHE:-$HOME/.cache/tandem}
OUT="$CACHE/k8s-v$KV-$GOV/bin"
BINS=(etcd kube-apiserver kube-controller-manager)

have_all() { for b in "${BINS[@]}"; do [[ -x "$OUT/$b" ]] || return 1; done; }
if have_all; then echo "$OUT"; exit 0; fi

# Build into a scratch dir and rename at the end, so an interrupted build never leaves a
# half-populated cache that the check above would trust.
TMP="$CACHE/.k8s-v$KV-$GOV.tmp.$$"
rm -rf "$TMP"; mkdir -p "$TMP"
trap 'rm -rf "$TMP"' EXIT

NOW=$(date -u +%Y-%m-%dT%H:%M:%SZ)
LDF="-s -w"
for P in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LDF="$LDF -X '$P.gitVersion=v$KV' -X '$P.gitMajor=1' -X '$P.gitMinor=$MINOR'"
  LDF="$LDF -X '$P.gitTreeState=clean' -X '$P.gitCommit=module-v$KV' -X '$P.buildDate=$NOW'"
done
echo "building Kubernetes v$KV control plane with $GOV into $OUT (cold: ~20-40 min on 2 cores)" >&2
go build -trimpath -ldflags "$LDF" -o "$TMP/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager >&2
go build -trimpath -ldflags "-s -w" -o "$TMP/etcd" go.etcd.io/etcd/server/v3 >&2
"$TMP/kube-apiserver" --version >&2
"$TMP/etcd" --version >&2
mkdir -p "$(dirname "$OUT")"
rm -rf "$OUT"
mv "$TMP" "$OUT"
trap - EXIT
echo "$OUT"
