# The node agent's end-to-end scenarios need the binaries the node maps images to: the
# webhook (run as a process) and the proxy (tandem-init and the sidecar). The test binaries
# (tandem-container, tandem-testapp) are built by cargo test itself.

.PHONY: e2e-bins

e2e-bins: ## build the webhook and proxy binaries the local-cluster scenarios run
	$(CARGO) build --locked -p tandem-webhook $(if $(wildcard proxy/Cargo.toml),-p tandem-proxy)

e2e: e2e-bins
