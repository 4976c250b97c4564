# tandem-operator (crate operator/): unit tests of the pure core, integration tests against the
# real local control plane (tests/, harness from the local-cluster work), and the benchmark.

.PHONY: test-operator bench-operator

# Its clippy run and unit tests are part of `make lint` and `make unit`; this adds the
# scenarios against the real control plane, which plain `cargo test` skips (#[ignore]).
test-operator: ## operator: the integration tests against a real apiserver
	TANDEM_K8S_BIN="$$(tests/k8s/build.sh)" \
	  $(CARGO) test -p tandem-operator --test configmaps --test identity --test authorization --test stream --locked -- --ignored --test-threads=1

# The scale benchmark: bounded (gives up after 20 min, 12 with QUICK=1); its report goes to
# $(BENCH_OUT)/[quick-]operator-report.md. `make bench` runs it after the proxy benchmark.
bench-operator: ## operator: 1,000 Services, 5,000 endpoints, 200 ServiceAccounts against a real apiserver
	TANDEM_K8S_BIN="$$(tests/k8s/build.sh)" QUICK=$(QUICK) TANDEM_BENCH_OUT="$(abspath $(BENCH_OUT))" \
	  $(CARGO) bench -p tandem-operator --bench operator_scale --locked

TEST_TARGETS += test-operator
