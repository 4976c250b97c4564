# tandemctl (crate tandemctl/): the CLI, also the kubectl plugin kubectl-tandem. Its clippy run
# and unit tests are part of `make lint` and `make unit`; this adds the golden-output tests
# against a real kube-apiserver, which plain `cargo test` skips (#[ignore]).

.PHONY: test-tandemctl install-tandemctl

test-tandemctl: ## tandemctl: explain's golden table and JSON against a real apiserver
	TANDEM_K8S_BIN="$$(tests/k8s/build.sh)" \
	  $(CARGO) test -p tandemctl --test explain_apiserver --locked -- --ignored

install-tandemctl: ## install tandemctl and the kubectl plugin kubectl-tandem into ~/.cargo/bin
	$(CARGO) install --locked --path tandemctl

TEST_TARGETS += test-tandemctl
