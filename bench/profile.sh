#!/usr/bin/env bash
# Instructions per request of one proxy hop, counted by callgrind: bare Pingora (the floor),
# tandem-proxy with its default JSON access log, and tandem-proxy with `--access-log off`.
#
# Why callgrind: this machine's CPU counters are not available to perf, and wall-clock CPU on a
# shared 2-core machine is noisy; an instruction count is the same run after run for the same
# binary and load, whatever else the machine does. It is not time: a cache miss costs more than
# an add, and system calls are not counted. It is the profile that says *where* the work is.
#
# Usage: bench/profile.sh <bin-dir> <out.md> [requests]   (make bench-profile)
set -euo pipefail

BIN=${1:?bin dir (target/release)}
OUT=${2:?report path}
REQUESTS=${3:-2000}
RATE=200
SECONDS_OF_LOAD=$((REQUESTS / RATE))
WORK=$(mktemp -d /tmp/tandem-profile.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_port() {
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}

UPSTREAM=$(free_port)
"$BIN/tandem-bench" upstream --listen "127.0.0.1:$UPSTREAM" >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)
wait_port "$UPSTREAM"

cat >"$WORK/config.json" <<JSON
{"apiVersion": "tandem.dev/proxy-config/v1", "version": "profile",
 "workload": {"namespace": "bench", "serviceAccount": "client"},
 "services": [{"name": "upstream", "namespace": "bench", "clusterIps": ["127.0.0.1"],
   "ports": [{"name": "http", "port": $UPSTREAM, "protocol": "http",
     "endpoints": [{"address": "127.0.0.1:$UPSTREAM", "meshed": false}]}]}]}
JSON

# profile <name> <command...>: runs the proxy under callgrind, warms it up, zeroes the counters,
# sends $REQUESTS requests and dumps; prints "<name> <instructions> <requests ok>".
profile() {
  local name=$1; shift
  local port; port=$(free_port)
  local out="$WORK/$name.callgrind"
  local cmd=("$@")
  cmd=("${cmd[@]//@PORT@/$port}")
  valgrind --tool=callgrind --callgrind-out-file="$out" "${cmd[@]}" >"$WORK/$name.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  wait_port "$port"
  local load=("$BIN/tandem-bench" load --target "127.0.0.1:$port" --authority "127.0.0.1:$UPSTREAM"
    --connections 8)
  "${load[@]}" --rate 100 --seconds 2 >/dev/null
  callgrind_control -z "$pid" >/dev/null
  "${load[@]}" --rate "$RATE" --seconds "$SECONDS_OF_LOAD" >"$WORK/$name.load"
  callgrind_control -d "$pid" >/dev/null
  kill -9 "$pid" 2>/dev/null || true
  local ok; ok=$(grep -o 'ok [0-9]*' "$WORK/$name.load" | awk '{print $2}')
  local ir; ir=$(grep -h '^summary:' "$out".* | awk '{print $2}')
  echo "$name $ir $ok"
}

echo "profiling: $REQUESTS requests at $RATE req/s through each proxy under callgrind"
P=$(profile pingora "$BIN/tandem-bench" pingora --listen 127.0.0.1:@PORT@ --upstream "127.0.0.1:$UPSTREAM")
echo "  $P"
T=$(profile tandem "$BIN/tandem-proxy" run --config "$WORK/config.json" --outbound-addr 127.0.0.1:@PORT@ \
  --inbound-addr "127.0.0.1:$(free_port)" --admin-addr "127.0.0.1:$(free_port)")
echo "  $T"
Q=$(profile tandem-no-access-log "$BIN/tandem-proxy" run --config "$WORK/config.json" --access-log off \
  --outbound-addr 127.0.0.1:@PORT@ --inbound-addr "127.0.0.1:$(free_port)" --admin-addr "127.0.0.1:$(free_port)")
echo "  $Q"

top() { # the 12 functions with the most instructions of their own
  # Frames that were running when the counters were zeroed (the thread start and the runtime's
  # worker loop) show the whole total; they are left out.
  # shellcheck disable=SC2016 # a Python program: its $ are not the shell's
  callgrind_annotate --threshold=100 "$1" 2>/dev/null | python3 -c '
import re, sys
rows = [re.match(r"\s*([\d,]+) \(\s*([\d.]+)%\)\s+(.*)", l) for l in sys.stdin]
rows = [r for r in rows if r and float(r.group(2)) < 90 and "PROGRAM TOTALS" not in r.group(3)]
for r in rows[:12]:
    name = re.sub(r"^/root/.cargo/registry/src/[^/]+/|^/rustc/[0-9a-f]+/", "", r.group(3))
    name = re.sub(r" \[[^]]*\]$", "", name).replace("|", "\\|")
    print(f"| {r.group(1)} | {r.group(2)} % | `{name}` |")
'
}

{
  echo "# Instructions per request, one hop, HTTP/1.1 (callgrind)"
  echo
  echo "Machine: $(nproc) cores, $(uname -r). Date: $(date -u +%Y-%m-%dT%H:%MZ)."
  echo "Reproduce: \`make bench-profile\` ($REQUESTS requests at $RATE req/s over 8 connections,"
  echo "after a 2 s warm-up; counters zeroed between)."
  echo
  echo "| proxy | instructions | requests ok | instructions per request | ÷ bare Pingora |"
  echo "|---|---:|---:|---:|---:|"
  base=$(echo "$P" | awk '{print $2 / $3}')
  for row in "$P" "$T" "$Q"; do
    echo "$row" | awk -v base="$base" '{printf "| %s | %\047d | %d | %\047.0f | %.2f× |\n", $1, $2, $3, $2 / $3, ($2 / $3) / base}'
  done
  echo
  echo "Instruction counts are repeatable for a given build and load; they leave out system calls"
  echo "and do not weigh cache misses, so they say where the work is, not what it costs in time."
  echo "CPU seconds per request come from \`make bench\`."
  echo
  echo "## tandem-proxy: functions with the most instructions of their own"
  echo
  echo "| instructions | share | function |"
  echo "|---:|---:|---|"
  top "$WORK"/tandem.callgrind.1
  echo
  echo "## bare Pingora: functions with the most instructions of their own"
  echo
  echo "| instructions | share | function |"
  echo "|---:|---:|---|"
  top "$WORK"/pingora.callgrind.1
} >"$OUT"
echo "report: $OUT"
