# The node agent's end-to-end scenarios need Tandem's binaries: the webhook and the operator
# (run as processes under their own ServiceAccounts) and the proxy (tandem-init and the
# sidecar, which the node maps the proxy image to). The test binaries (tandem-container,
# tandem-testapp) are built by cargo test itself.

.PHONY: e2e-bins

e2e-bins: ## build the webhook, operator and proxy binaries the local-cluster scenarios run
	$(CARGO) build --locked -p tandem-webhook -p tandem-operator -p tandem-proxy

e2e: e2e-bins

# `make demo`: Tandem's main job in one command. tandem-demo (tests/src/bin/tandem-demo.rs)
# brings up the local cluster (control plane, Tandem's webhook and operator, a node agent),
# deploys the sample app, measures each route before and after its sample policy through the
# injected sidecars, prints the table, and keeps the cluster running for kubectl;
# tests/demo/demo.sh runs it in the background, shows its progress, and stops it
# (`make demo-down`).

.PHONY: demo demo-down

# The demo cluster's files: PKI, admin kubeconfig, logs, etcd data, the node's pods.
DEMO_DIR ?= $(TANDEM_CACHE)/demo
# Seconds from starting tandem-demo to its table (the builds before it are not counted).
DEMO_TIMEOUT ?= 900

demo: cluster-bins e2e-bins ## Tandem's main job: local cluster, sample app and policies, a before/after table; the cluster stays up
	@[ "$$(id -u)" = 0 ] || { echo "make demo needs root: it creates network namespaces" >&2; exit 1; }
	$(CARGO) build --locked -p tandem-tests --bins
	@# What Tandem::install builds when it starts them, package by package as it does, so that
	@# the demo finds them up to date instead of compiling in the middle of its progress.
	$(CARGO) build --locked -p tandem-webhook --bin tandem-webhook
	$(CARGO) build --locked -p tandem-operator --bin tandem-operator
	@echo "==> Tandem demo: a local Kubernetes $(K8S_VERSION) cluster, Tandem, the sample app and policies"
	@TANDEM_K8S_BIN="$$(tests/k8s/build.sh)" TANDEM_DEMO_DIR=$(DEMO_DIR) DEMO_TIMEOUT=$(DEMO_TIMEOUT) \
	  KUBECTL=$(KUBECTL) tests/demo/demo.sh up

demo-down: ## stop the cluster `make demo` left running (idempotent)
	@TANDEM_DEMO_DIR=$(DEMO_DIR) tests/demo/demo.sh down
