# tandem-operator (crate operator/): unit tests of the pure core, integration tests against the
# real local control plane (tests/, harness from the local-cluster work), and the benchmark.

.PHONY: test-operator bench-operator

# Its clippy run and unit tests are part of `make lint` and `make unit`; this adds the
# scenarios against the real control plane, which plain `cargo test` skips (#[ignore]).
test-operator: ## operator: the integration tests against a real apiserver
	TANDEM_K8S_BIN="$$(tests/k8s/build.sh)" \
	  $(CARGO) test -p tandem-operator --test configmaps --test identity --test authorization --test stream --locked -- --ignored --test-threads=1

# The scale benchmark: bounded (gives up after 40 min, 20 with QUICK=1); its report goes to
# $(BENCH_OUT)/[quick-]operator-report.md. `make bench` runs it after the proxy benchmark.
# Full: 10,000 Services x 5 endpoints, 1,000 ServiceAccounts, 10,000 simulated stream clients;
# QUICK=1: 4,000 Services, 200 ServiceAccounts, 1,000 clients (operator/benches/operator_scale/scale.rs).
bench-operator: ## operator: Services, workloads and a fleet of stream clients at scale against a real apiserver
	TANDEM_K8S_BIN="$$(tests/k8s/build.sh)" QUICK=$(QUICK) TANDEM_BENCH_OUT="$(abspath $(BENCH_OUT))" \
	  $(CARGO) bench -p tandem-operator --bench operator_scale --locked

TEST_TARGETS += test-operator
