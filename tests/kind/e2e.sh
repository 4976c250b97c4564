#!/usr/bin/env bash
# `make e2e-kind`: the end-to-end scenarios on a kind cluster, where Docker runs.
#
# Creates the kind cluster of manifests/kind/cluster.yaml, builds Tandem's images and the test
# app from the Dockerfile, loads them into the nodes, installs Tandem from manifests/ exactly as
# a user would, deploys manifests/samples/app.yaml and checks, with kubectl only:
#   a. pods in the labelled namespace are injected (tandem-init, the tandem-proxy native
#      sidecar) and client -> server traffic flows through both proxies (their metrics);
#   b. the 90/10 canary sample splits traffic within a few points;
#   e. the invalid sample is refused by the apiserver;
#   g. a pod in an unlabelled namespace and an opted-out pod are not injected.
# KEEP=1 leaves the cluster running afterwards.
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=tandem
KUBECTL=(kubectl --context "kind-$CLUSTER")

die() { echo "e2e-kind: $*" >&2; exit 1; }
step() { printf '\n==> %s\n' "$*"; }

command -v docker >/dev/null || die "Docker is not installed; make e2e-kind needs Docker and kind (the local cluster, make e2e, needs neither)."
docker info >/dev/null 2>&1 || die "no Docker engine is running; make e2e-kind needs one (make e2e runs the same scenarios without Docker)."
command -v kind >/dev/null || die "kind is not installed (go install sigs.k8s.io/kind@latest)."
command -v kubectl >/dev/null || die "kubectl is not installed."

step "kind cluster '$CLUSTER'"
kind get clusters 2>/dev/null | grep -qx "$CLUSTER" || kind create cluster --config manifests/kind/cluster.yaml --wait 120s
[[ "${KEEP:-0}" == 1 ]] || trap 'kind delete cluster --name "$CLUSTER"' EXIT

step "images"
for target in proxy:tandem-proxy:0.1.0 operator:tandem-operator:0.1.0 webhook:tandem-webhook:0.1.0 testapp:tandem-testapp:dev; do
  stage=${target%%:*}; image=${target#*:}
  docker build --target "$stage" -t "$image" .
  kind load docker-image --name "$CLUSTER" "$image"
done

step "install Tandem from manifests/"
"${KUBECTL[@]}" apply -f manifests/crds/
"${KUBECTL[@]}" apply -f manifests/operator/namespace.yaml
"${KUBECTL[@]}" apply -f manifests/operator/ -f manifests/webhook/
"${KUBECTL[@]}" -n tandem-system rollout status deploy --timeout=180s

step "a. sample app in a labelled namespace"
"${KUBECTL[@]}" apply -f manifests/samples/app.yaml
"${KUBECTL[@]}" -n shop rollout status deploy --timeout=180s
for pod in $("${KUBECTL[@]}" -n shop get pods -o name); do
  inits=$("${KUBECTL[@]}" -n shop get "$pod" -o jsonpath='{.spec.initContainers[*].name}')
  [[ "$inits" == *tandem-init*tandem-proxy* ]] || die "$pod is not injected (init containers: $inits)"
done
client=$("${KUBECTL[@]}" -n shop get pods -l app=client -o name | head -n1)
sleep 10
"${KUBECTL[@]}" get --raw "/api/v1/namespaces/shop/pods/${client#pod/}:15020/proxy/metrics" \
  | grep -q 'direction="outbound"' || die "the client's proxy reports no outbound traffic"

step "b. 90/10 canary"
"${KUBECTL[@]}" apply -f manifests/samples/canary-split.yaml
"${KUBECTL[@]}" -n shop wait tp/server-canary --for=condition=Programmed --timeout=120s
sleep 70   # a ConfigMap volume reaches the pod within the kubelet's sync period
"${KUBECTL[@]}" -n shop port-forward "$client" 19090:9090 >/dev/null 2>&1 &
pf=$!; sleep 2
curl -fsS 'http://127.0.0.1:19090/stats?reset=1' >/dev/null; sleep 20
stats=$(curl -fsS http://127.0.0.1:19090/stats); kill "$pf"
echo "$stats"
python3 - "$stats" <<'PY'
import json, sys
s = json.loads(sys.argv[1])["by_body"]
v1, v2 = s.get("v1", 0), s.get("v2", 0)
share = 100 * v2 / max(v1 + v2, 1)
print(f"v2 share {share:.1f}% of {v1 + v2}")
sys.exit(0 if 5 <= share <= 15 else 1)
PY

step "e. an invalid policy is refused by the apiserver"
if "${KUBECTL[@]}" apply -f manifests/samples/invalid-policy.yaml 2>/tmp/tandem-invalid.txt; then
  die "the invalid sample was accepted"
fi
grep -q "perTryTimeout must not be longer" /tmp/tandem-invalid.txt || die "unexpected refusal: $(cat /tmp/tandem-invalid.txt)"

step "g. unlabelled namespace and opted-out pod"
"${KUBECTL[@]}" create namespace plain --dry-run=client -o yaml | "${KUBECTL[@]}" apply -f -
"${KUBECTL[@]}" -n plain run plain --image=tandem-testapp:dev --restart=Never -- server
"${KUBECTL[@]}" -n shop run optout --image=tandem-testapp:dev --restart=Never \
  --annotations=tandem.dev/inject=disabled -- server
for p in plain/plain shop/optout; do
  inits=$("${KUBECTL[@]}" -n "${p%/*}" get pod "${p#*/}" -o jsonpath='{.spec.initContainers[*].name}')
  [[ -z "$inits" ]] || die "$p was injected"
done

echo "e2e-kind: all scenarios passed"
