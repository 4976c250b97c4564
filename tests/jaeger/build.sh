#!/usr/bin/env bash
# build.sh — build Jaeger v2 (the OpenTelemetry-Collector-based `jaeger` binary: OTLP receiver,
# in-memory store, query API) for the pinned release into
# $TANDEM_CACHE/jaeger-v<release>-go<go version>/bin, once per machine. Prints that bin directory.
#
# The telemetry e2e test (tests/tests/e2e_telemetry.rs) runs it as the OTLP/HTTP collector the
# proxies export to, and reads the spans back from its query API (/api/traces).
# The release is pinned in JAEGER_VERSION and go.mod/go.sum (`go get -tool
# github.com/jaegertracing/jaeger/cmd/jaeger@v<release>`, then `go mod tidy`).
set -euo pipefail
cd "$(dirname "$0")"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
JV=$(cat JAEGER_VERSION)
GOV=$(go env GOVERSION)
CACHE=${TANDEM_CACHE:-$HOME/.cache/tandem}
OUT="$CACHE/jaeger-v$JV-$GOV/bin"

if [[ -x "$OUT/jaeger" ]]; then echo "$OUT"; exit 0; fi

# Build into a scratch dir and rename at the end, so an interrupted build never leaves a
# half-populated cache that the check above would trust.
TMP="$CACHE/.jaeger-v$JV-$GOV.tmp.$$"
rm -rf "$TMP"; mkdir -p "$TMP"
trap 'rm -rf "$TMP"' EXIT

echo "building Jaeger v$JV with $GOV into $OUT (cold: ~10-20 min on 2 cores)" >&2
go build -trimpath -ldflags "-s -w" -o "$TMP/jaeger" github.com/jaegertracing/jaeger/cmd/jaeger >&2
"$TMP/jaeger" version >&2 || true
mkdir -p "$(dirname "$OUT")"
rm -rf "$OUT"
mv "$TMP" "$OUT"
trap - EXIT
echo "$OUT"
