# tandem-operator (crate operator/): unit tests of the pure core, integration tests against the
# real local control plane (tests/, harness from the local-cluster work), and the benchmark.

.PHONY: test-operator bench-operator

test-operator: ## operator: unit tests, clippy, and the integration tests against a real apiserver
	$(CARGO) clippy -p tandem-operator --all-targets --locked -- -D warnings
	$(CARGO) test -p tandem-operator --locked
	TANDEM_K8S_BIN="$$(tests/k8s/build.sh)" \
	  $(CARGO) test -p tandem-operator --test configmaps --locked -- --ignored --test-threads=1

bench-operator: ## operator: 1,000 Services, 5,000 endpoints, 200 ServiceAccounts against a real apiserver
	TANDEM_K8S_BIN="$$(tests/k8s/build.sh)" \
	  $(CARGO) bench -p tandem-operator --bench operator_scale --locked

TEST_TARGETS += test-operator
