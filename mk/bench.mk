# Benchmarks (issue 4). `make bench` runs every scenario in 5 rounds (an estimated 47 minutes on the
# 2-core machine), then the resilience run and the capture run (about 13 minutes; needs root,
# ip, iptables and nsenter, else it says why it is skipped); `make bench QUICK=1` runs the same
# scenarios shortened (under 5 minutes once built, the capture run about 1; it skips the
# operator benchmark). Reports, charts and raw results go to bench/results/. `make test` does
# not run the benchmark; its pure parts are unit-tested and the capture topology is checked
# end to end (as root) by `cargo test` (make unit).
#
# The side-by-side run measures every topology or refuses to run (exit 64, saying what is
# missing): BENCH_SKIP leaves some out on purpose, and the report lists them as left out.
# Names as `tandem-bench run --skip` takes them, space- or comma-separated:
# direct pingora haproxy nginx nginx2 nginx2-mtls tandem1 tandem2 tandem2-mtls tandem2-authz1
# tandem2-authz10 tandem2-authz100 tandem2-trace1 tandem2-trace100 (e.g. `make bench
# BENCH_SKIP=haproxy,nginx`).
#
# A recipe's lines are all expanded before its first one runs, so nothing here may ask make
# ($(wildcard), $(shell)) about a file an earlier line of the same recipe builds (issue 21:
# a wildcard on target/release/tandem-proxy left tandem out of the first run on a fresh
# clone). The proxy is always built with the bench and always passed to it.

QUICK ?= 0
BENCH_OUT ?= bench/results
BENCH_ARGS ?=
BENCH_SKIP ?=
BENCH_BIN := target/release/tandem-bench
TANDEM_PROXY_BIN := target/release/tandem-proxy
bench_comma := ,
BENCH_SKIP_ARGS = $(addprefix --skip=,$(subst $(bench_comma), ,$(BENCH_SKIP)))
# What the capture run calls.
BENCH_CAPTURE_TOOLS := ip iptables nsenter

.PHONY: bench-authz bench-trace bench bench-deps bench-capture-deps bench-resilience bench-capture bench-profile

bench-deps: ## install the proxies compared against (Debian's haproxy and nginx), once
	@if ! [ -x /usr/sbin/haproxy ] || ! [ -x /usr/sbin/nginx ]; then \
	  echo "installing haproxy and nginx"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy nginx; \
	fi

# Without them a fresh machine's `make bench` would skip the capture run (it says so and
# succeeds); as another user it is skipped anyway, so nothing is installed then.
bench-capture-deps: ## as root, install what the capture run calls (ip, iptables, nsenter), once
	@missing=""; for tool in $(BENCH_CAPTURE_TOOLS); do \
	  command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ]; then \
	  echo "installing the capture run's tools (missing:$$missing)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 iptables util-linux; \
	fi

bench: bench-deps bench-capture-deps ## side-by-side benchmark (QUICK=1: under 5 min); report in bench/results/
	@# One cargo invocation for both: built apart, feature unification differs and Pingora is
	@# compiled twice.
	$(CARGO) build --release -p tandem-bench -p tandem-proxy
	QUICK=$(QUICK) $(BENCH_BIN) run --out $(BENCH_OUT) --tandem-proxy $(TANDEM_PROXY_BIN) \
	  $(BENCH_SKIP_ARGS) $(BENCH_ARGS)
	QUICK=$(QUICK) $(BENCH_BIN) resilience --out $(BENCH_OUT) --tandem-proxy $(TANDEM_PROXY_BIN)
	QUICK=$(QUICK) $(BENCH_BIN) capture --out $(BENCH_OUT) --tandem-proxy $(TANDEM_PROXY_BIN)
	@# The operator at scale (mk/operator.mk): about 6 minutes, so the full run only; QUICK
	@# skips it (its own quick mode alone takes over 3): `make bench-operator QUICK=1`.
	$(if $(filter 1 true yes,$(QUICK)),@echo "QUICK: operator benchmark skipped (make bench-operator QUICK=1)",$(MAKE) --no-print-directory bench-operator)

bench-authz: ## authorization's cost: 1, 10 and 100 rules vs none, on the mTLS two hops (QUICK=1: about 3 min); report in bench/results/authz/
	$(CARGO) build --release -p tandem-bench -p tandem-proxy
	QUICK=$(QUICK) $(BENCH_BIN) run --out $(BENCH_OUT)/authz --tandem-proxy $(TANDEM_PROXY_BIN) \
	  --only tandem2-mtls,tandem2-authz1,tandem2-authz10,tandem2-authz100

bench-trace: ## tracing's cost: 1 % and 100 % sampling vs off, on the plaintext two hops, OTLP to a load sink (QUICK=1: about 3 min); report in bench/results/trace/
	$(CARGO) build --release -p tandem-bench -p tandem-proxy
	QUICK=$(QUICK) $(BENCH_BIN) run --out $(BENCH_OUT)/trace --tandem-proxy $(TANDEM_PROXY_BIN) \
	  --only tandem2,tandem2-trace1,tandem2-trace100

bench-resilience: ## success rate while one of three endpoints fails (60 s per policy; QUICK=1: 10 s)
	$(CARGO) build --release -p tandem-bench -p tandem-proxy
	QUICK=$(QUICK) $(BENCH_BIN) resilience --out $(BENCH_OUT) --tandem-proxy $(TANDEM_PROXY_BIN)

bench-capture: bench-capture-deps ## what iptables capture costs: 2 hops captured vs not, in network namespaces (root; QUICK=1: about 1 min)
	$(CARGO) build --release -p tandem-bench -p tandem-proxy
	QUICK=$(QUICK) $(BENCH_BIN) capture --out $(BENCH_OUT) --tandem-proxy $(TANDEM_PROXY_BIN)

bench-profile: ## instructions per request under callgrind: bare Pingora vs tandem-proxy (about 3 min)
	@command -v valgrind >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind; }
	$(CARGO) build --release -p tandem-bench -p tandem-proxy
	bench/profile.sh target/release $(BENCH_OUT)/profile.md
