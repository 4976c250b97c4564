# Benchmarks (issue 4). `make bench` runs every scenario in 5 rounds (about 35 minutes on the
# 2-core machine), then the resilience run and the capture run (about 13 minutes; needs root,
# ip, iptables and nsenter, else it says why it is skipped); `make bench QUICK=1` runs the same
# scenarios shortened (under 5 minutes once built, the capture run about 1; it skips the
# operator benchmark). Reports, charts and raw results go to bench/results/. `make test` does
# not run the benchmark; its pure parts are unit-tested and the capture topology is checked
# end to end (as root) by `cargo test` (make unit).

QUICK ?= 0
BENCH_OUT ?= bench/results
BENCH_ARGS ?=
BENCH_BIN := target/release/tandem-bench
TANDEM_PROXY_BIN := target/release/tandem-proxy

.PHONY: bench bench-deps bench-resilience bench-capture bench-profile

bench-deps: ## install the proxies compared against (Debian's haproxy and nginx), once
	@if ! [ -x /usr/sbin/haproxy ] || ! [ -x /usr/sbin/nginx ]; then \
	  echo "installing haproxy and nginx"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy nginx; \
	fi

bench: bench-deps ## side-by-side benchmark (QUICK=1: under 5 min); report in bench/results/
	@# One cargo invocation for both: built apart, feature unification differs and Pingora is
	@# compiled twice.
	$(CARGO) build --release -p tandem-bench $(if $(wildcard proxy/Cargo.toml),-p tandem-proxy)
	QUICK=$(QUICK) $(BENCH_BIN) run --out $(BENCH_OUT) \
	  $(if $(wildcard $(TANDEM_PROXY_BIN)),--tandem-proxy $(TANDEM_PROXY_BIN)) $(BENCH_ARGS)
	QUICK=$(QUICK) $(BENCH_BIN) resilience --out $(BENCH_OUT) --tandem-proxy $(TANDEM_PROXY_BIN)
	QUICK=$(QUICK) $(BENCH_BIN) capture --out $(BENCH_OUT) --tandem-proxy $(TANDEM_PROXY_BIN)
	@# The operator at scale (mk/operator.mk): about 6 minutes, so the full run only; QUICK
	@# skips it (its own quick mode alone takes over 3): `make bench-operator QUICK=1`.
	$(if $(filter 1 true yes,$(QUICK)),@echo "QUICK: operator benchmark skipped (make bench-operator QUICK=1)",$(MAKE) --no-print-directory bench-operator)

bench-resilience: ## success rate while one of three endpoints fails (60 s per policy; QUICK=1: 10 s)
	$(CARGO) build --release -p tandem-bench -p tandem-proxy
	QUICK=$(QUICK) $(BENCH_BIN) resilience --out $(BENCH_OUT) --tandem-proxy $(TANDEM_PROXY_BIN)

bench-capture: ## what iptables capture costs: 2 hops captured vs not, in network namespaces (root; QUICK=1: about 1 min)
	$(CARGO) build --release -p tandem-bench -p tandem-proxy
	QUICK=$(QUICK) $(BENCH_BIN) capture --out $(BENCH_OUT) --tandem-proxy $(TANDEM_PROXY_BIN)

bench-profile: ## instructions per request under callgrind: bare Pingora vs tandem-proxy (about 3 min)
	@command -v valgrind >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind; }
	$(CARGO) build --release -p tandem-bench -p tandem-proxy
	bench/profile.sh target/release $(BENCH_OUT)/profile.md
