# The node agent's end-to-end scenarios need Tandem's binaries: the webhook and the operator
# (run as processes under their own ServiceAccounts) and the proxy (tandem-init and the
# sidecar, which the node maps the proxy image to). The test binaries (tandem-container,
# tandem-testapp) are built by cargo test itself.

.PHONY: e2e-bins

e2e-bins: ## build the webhook, operator and proxy binaries the local-cluster scenarios run
	$(CARGO) build --locked -p tandem-webhook -p tandem-operator -p tandem-proxy

e2e: e2e-bins

.PHONY: demo

# Today's demo is the end-to-end scenarios a-f, narrated: a real control plane, Tandem
# installed (webhook and operator), the sample app injected and run by the node agent, traffic
# measured through both proxies, then the sample canary, retries, a circuit breaker, invalid
# policies and control-plane restarts, each with what it measured before and after.
demo: cluster-bins e2e-bins ## Tandem's main job on a local cluster: inject a sample app, drive meshed traffic, show it
	@echo "==> Tandem demo: local Kubernetes $(K8S_VERSION) control plane, webhook, operator, node agent, sample app (manifests/samples/app.yaml) and policies"
	@echo "    (root needed for network namespaces; the first run builds Kubernetes once, about 10-40 min)"
	TANDEM_K8S_BIN="$$(tests/k8s/build.sh)" $(CARGO) test -q -p tandem-tests --locked --test e2e_inject -- \
	  --ignored --nocapture --exact a_meshed_app_is_injected_steered_by_policies_and_undisturbed_by_restarts
	@echo
	@echo "==> Next: keep a cluster to explore with kubectl:"
	@echo "    make cluster-up && export KUBECONFIG=$(CLUSTER_DIR)/admin.kubeconfig"
	@echo "    $(KUBECTL) apply -f manifests/crds/ && $(KUBECTL) create ns shop && $(KUBECTL) apply -f manifests/samples/canary-split.yaml"
	@echo "    $(KUBECTL) get tp -n shop ; $(KUBECTL) explain trafficpolicy.spec.rules.retries"
	@echo "    make cluster-down   # tear it down"
