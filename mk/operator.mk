# tandem-operator (crate operator/): unit tests of the pure core, integration tests against the
# real local control plane (tests/, harness from the local-cluster work), and the benchmark.

.PHONY: test-operator bench-operator

test-operator: ## operator: unit tests, clippy, and the integration tests against a real apiserver
	$(CARGO) clippy -p tandem-operator --all-targets --locked -- -D warnings
	$(CARGO) test -p tandem-operator --locked
	$(CARGO) build -p tandem-operator --locked
	TANDEM_K8S_BIN="$$(tests/k8s/build.sh)" TANDEM_OPERATOR_BIN="$(CURDIR)/target/debug/tandem-operator" \
	  $(CARGO) test -p tandem-tests --test operator_configmaps --locked -- --ignored --test-threads=1

bench-operator: ## operator: 1,000 Services, 5,000 endpoints, 200 ServiceAccounts against a real apiserver
	$(CARGO) build -p tandem-operator --release --locked
	TANDEM_K8S_BIN="$$(tests/k8s/build.sh)" TANDEM_OPERATOR_BIN="$(CURDIR)/target/release/tandem-operator" \
	  $(CARGO) test -p tandem-tests --release --test operator_bench --locked -- --ignored --nocapture

TEST_TARGETS += test-operator
