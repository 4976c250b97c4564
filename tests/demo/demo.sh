#!/usr/bin/env bash
# `make demo` and `make demo-down`.
#
#   demo.sh up    stops a previous demo, starts tandem-demo in its own session in the
#                 background, shows its progress and its table, then says how to use the
#                 cluster it leaves running
#   demo.sh down  stops it: SIGTERM (it stops every pod, removes their network namespaces,
#                 stops Tandem and the control plane), and if it does not stop within 60 s,
#                 kills what is left of its session and removes its namespaces. Idempotent.
#
# Environment: TANDEM_DEMO_DIR (required), TANDEM_DEMO_BIN, DEMO_TIMEOUT (seconds until the
# table, default 900), KUBECTL.
set -euo pipefail

dir=${TANDEM_DEMO_DIR:?TANDEM_DEMO_DIR must name the demo directory}
bin=${TANDEM_DEMO_BIN:-target/debug/tandem-demo}
timeout=${DEMO_TIMEOUT:-900}
kubectl=${KUBECTL:-kubectl}

# The pid in $dir/pid if that process is a running tandem-demo.
running_pid() {
  local pid
  [[ -f $dir/pid ]] || return 1
  pid=$(<"$dir/pid")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q tandem-demo || return 1
  echo "$pid"
}

# Processes still in session $1 that the demo started (a killed run's children), by pid.
leftovers() {
  local pid
  for pid in $(pgrep -s "$1" 2>/dev/null || true); do
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null |
      grep -qE 'tandem-(demo|proxy|testapp|container|webhook|operator)|etcd|kube-apiserver|kube-controller-manager'; then
      echo "$pid"
    fi
  done
}

down() {
  local pid session left ns uid pod
  if pid=$(running_pid); then
    kill -TERM "$pid"
    for _ in $(seq 1 300); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "tandem-demo did not stop within 60 s: killing what is left of it" >&2
    fi
    echo "demo stopped"
  else
    echo "no demo running"
  fi
  # What a killed or crashed run may have left: its processes, its network namespaces.
  if [[ -f $dir/pid ]]; then
    session=$(<"$dir/pid")
    if [[ $session =~ ^[0-9]+$ ]]; then
      left=$(leftovers "$session")
      if [[ -n $left ]]; then
        # shellcheck disable=SC2086 # one pid per word
        kill -KILL $left 2>/dev/null || true
      fi
      ip netns delete "tandem-node-$session" 2>/dev/null || true
    fi
  fi
  for pod in "$dir"/node/pods/*/; do
    [[ -d $pod ]] || continue
    uid=$(basename "$pod")
    ns="tandem-pod-$(tr -cd '0-9a-fA-F' <<<"$uid" | cut -c1-10)"
    ip netns delete "$ns" 2>/dev/null || true
    rm -rf "$pod"
  done
  rm -f "$dir/pid" "$dir/ready"
}

up() {
  local pid follower deadline
  [[ $(id -u) == 0 ]] || { echo "make demo needs root: it creates network namespaces" >&2; exit 1; }
  [[ -x $bin ]] || { echo "$bin not built" >&2; exit 1; }
  down >/dev/null
  mkdir -p "$dir"
  : >"$dir/demo.log"
  # Its own session: the demo outlives this script, and `down` finds what it started.
  setsid "$bin" --dir "$dir" >"$dir/demo.log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$dir/pid"
  tail -n +1 -f --pid="$pid" "$dir/demo.log" &
  follower=$!
  trap 'kill "$follower" 2>/dev/null; echo; echo "interrupted: stopping the demo"; down; exit 130' INT TERM
  deadline=$((SECONDS + timeout))
  while [[ ! -f $dir/ready ]]; do
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$follower" 2>/dev/null || true
      echo "==> the demo failed; its log: $dir/demo.log" >&2
      down >/dev/null
      exit 1
    fi
    if ((SECONDS > deadline)); then
      kill "$follower" 2>/dev/null || true
      echo "==> the demo did not finish within ${timeout} s; its log: $dir/demo.log" >&2
      down >/dev/null
      exit 1
    fi
    sleep 0.5
  done
  sleep 1 # let the follower print the table's last lines
  kill "$follower" 2>/dev/null || true
  wait "$follower" 2>/dev/null || true
  trap - INT TERM
  cat <<MSG

==> The cluster keeps running (tandem-demo, pid $pid): control plane, Tandem, the node and its pods.
    export KUBECONFIG=$dir/cluster/admin.kubeconfig
    $kubectl get pods -n shop -o wide
    $kubectl get trafficpolicies,circuitbreakerpolicies -n shop
    $kubectl get configmap tandem-proxy-client -n shop -o yaml     # what the client's proxy runs
    $kubectl apply -f manifests/samples/invalid-policy.yaml         # refused, with the reasons
==> Tear it down: make demo-down
MSG
}

case ${1:-} in
up) up ;;
down) down ;;
*)
  echo "usage: $0 up|down" >&2
  exit 64
  ;;
esac
