# tandem-proxy: the sidecar.
#
# The proxy's tests (unit, loopback integration, and the transparent path in network namespaces
# with iptables, which needs root) run under `make unit` with the rest of the workspace; the
# tools they call are installed first (proxy-deps). `make test-proxy` adds the check that the
# sidecar stays free of kube and k8s-openapi.

.PHONY: proxy proxy-deps test-proxy bench-proxy-hop

proxy: ## build the tandem-proxy binary (release)
	$(CARGO) build -p tandem-proxy --release --locked

proxy-deps: ## tools the proxy's tests call: ip, iptables, nsenter, curl, promtool (Debian's prometheus)
	@command -v ip >/dev/null && command -v iptables >/dev/null && command -v nsenter >/dev/null \
	  && command -v curl >/dev/null && command -v promtool >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 iptables util-linux curl \
	  prometheus; }

unit: proxy-deps

test-proxy: proxy-deps ## the sidecar's dependency tree has no kube (its tests run in make unit)
	@n=$$($(CARGO) tree -p tandem-proxy -e normal --locked | grep -c -E 'kube|k8s-openapi' || true); \
	  if [ "$$n" != 0 ]; then echo "tandem-proxy must not depend on kube ($$n matches)"; exit 1; fi; \
	  echo "tandem-proxy: no kube in the dependency tree"

TEST_TARGETS += test-proxy
