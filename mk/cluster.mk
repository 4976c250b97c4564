# The local cluster: a real control plane built from the pinned release in tests/k8s/, the
# node agent, and the end-to-end scenarios (tests/, crate tandem-tests).

K8S_VERSION := $(shell cat tests/k8s/KUBE_VERSION)
# Where `make cluster-up` keeps the PKI, kubeconfig, logs and etcd data of a cluster for people.
CLUSTER_DIR ?= $(TANDEM_CACHE)/cluster
# kubectl for people and manifest checks. /usr/bin/kubectl is a version dispatcher with no
# 1.34 build; 1.33 is within kubectl's supported skew (one minor) of the 1.34 apiserver.
KUBECTL ?= $(firstword $(wildcard /usr/lib/google-cloud-sdk/bin/kubectl.1.33) kubectl)

.PHONY: cluster-bins e2e e2e-tools cluster-up cluster-down

cluster-bins: ## build etcd, kube-apiserver, kube-controller-manager (once per machine, cached)
	tests/k8s/build.sh

# The cluster tests are #[ignore]d in plain `cargo test` (make unit), which must not start a
# half-hour Go build; here the binaries exist and they run, every one of them.
# tcpdump: the mTLS scenario captures the bytes on a pod's veth to prove nothing crosses it in
# plaintext.
e2e-tools: ## install tcpdump if missing (idempotent, needs root)
	@command -v tcpdump >/dev/null 2>&1 || { echo "installing tcpdump"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tcpdump; }

e2e: cluster-bins e2e-tools ## the local-cluster tests: real control plane, node agent, scenarios
	$(CARGO) build -p tandem-webhook --bin tandem-webhook --locked
	TANDEM_K8S_BIN="$$(tests/k8s/build.sh)" TANDEM_JAEGER_BIN="$$(tests/jaeger/build.sh)" \
	  $(CARGO) test -p tandem-tests --locked -- --ignored

cluster-up: cluster-bins ## start a local cluster in the background (KUBECONFIG printed)
	@if [[ -f $(CLUSTER_DIR)/pid ]] && kill -0 "$$(cat $(CLUSTER_DIR)/pid)" 2>/dev/null; then \
	  echo "already running: export KUBECONFIG=$(CLUSTER_DIR)/admin.kubeconfig"; exit 0; fi
	$(CARGO) build -p tandem-tests --bin tandem-cluster
	@rm -rf $(CLUSTER_DIR); mkdir -p $(dir $(CLUSTER_DIR))
	@TANDEM_K8S_BIN="$$(tests/k8s/build.sh)" nohup target/debug/tandem-cluster --dir $(CLUSTER_DIR) \
	  > $(CLUSTER_DIR).log 2>&1 & echo $$! > $(CLUSTER_DIR).pid
	@for i in $$(seq 1 600); do \
	  if [[ -f $(CLUSTER_DIR)/ready ]]; then break; fi; \
	  if ! kill -0 "$$(cat $(CLUSTER_DIR).pid)" 2>/dev/null; then cat $(CLUSTER_DIR).log; exit 1; fi; \
	  sleep 0.2; done
	@mv $(CLUSTER_DIR).pid $(CLUSTER_DIR)/pid
	@cat $(CLUSTER_DIR).log
	@echo "kubectl: $(KUBECTL) --kubeconfig $(CLUSTER_DIR)/admin.kubeconfig get ns"
	@echo "stop it: make cluster-down"

cluster-down: ## stop the local cluster started by cluster-up
	@if [[ -f $(CLUSTER_DIR)/pid ]]; then \
	  pid=$$(cat $(CLUSTER_DIR)/pid); kill "$$pid" 2>/dev/null || true; \
	  while kill -0 "$$pid" 2>/dev/null; do sleep 0.2; done; rm -f $(CLUSTER_DIR)/pid; \
	  echo "stopped"; else echo "no cluster running"; fi

E2E_TARGETS += e2e

# The telemetry scenario (tests/tests/e2e_telemetry.rs) runs a real Prometheus and promtool
# (Debian's prometheus package) and a real OTLP collector, Jaeger v2, built from the Go module
# proxy and cached like the Kubernetes binaries (tests/jaeger/build.sh; ~7 min cold on 2 cores).
.PHONY: telemetry-tools

telemetry-tools: ## install Prometheus and promtool, build Jaeger v2 (idempotent, cached)
	@command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || { \
	  echo "installing prometheus"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus; }
	tests/jaeger/build.sh >/dev/null

e2e: telemetry-tools
