# The node agent's end-to-end scenarios need the binaries the node maps images to: the
# webhook (run as a process) and the proxy (tandem-init and the sidecar). The test binaries
# (tandem-container, tandem-testapp) are built by cargo test itself.

.PHONY: e2e-bins

e2e-bins: ## build the webhook and proxy binaries the local-cluster scenarios run
	$(CARGO) build --locked -p tandem-webhook $(if $(wildcard proxy/Cargo.toml),-p tandem-proxy)

e2e: e2e-bins

.PHONY: demo

# Today's demo is the first end-to-end scenario, narrated: a real control plane, the webhook
# injecting a sample client and a two-version server, the node agent running exactly what was
# injected, and traffic measured through both proxies. The policies part of the demo (before
# and after a TrafficPolicy) waits for the long-running node agent (issue 6).
demo: cluster-bins e2e-bins ## Tandem's main job on a local cluster: inject a sample app, drive meshed traffic, show it
	@echo "==> Tandem demo: local Kubernetes $(K8S_VERSION) control plane, webhook, node agent, sample app (manifests/samples/app.yaml)"
	@echo "    (root needed for network namespaces; the first run builds Kubernetes once, about 10-40 min)"
	TANDEM_K8S_BIN="$$(tests/k8s/build.sh)" $(CARGO) test -q -p tandem-tests --locked --test e2e_inject -- \
	  --ignored --nocapture --exact a_labelled_namespace_gets_injected_pods_whose_traffic_crosses_both_proxies
	@echo
	@echo "==> Next: keep a cluster to explore with kubectl:"
	@echo "    make cluster-up && export KUBECONFIG=$(CLUSTER_DIR)/admin.kubeconfig"
	@echo "    $(KUBECTL) apply -f manifests/crds/ && $(KUBECTL) create ns shop && $(KUBECTL) apply -f manifests/samples/canary-split.yaml"
	@echo "    $(KUBECTL) get tp -n shop ; $(KUBECTL) explain trafficpolicy.spec.rules.retries"
	@echo "    make cluster-down   # tear it down"
