# tandem-webhook and tandem-init (issue 5).
#
# `cargo test --workspace` (make unit) runs their unit, golden and TLS tests. What it cannot
# run is the iptables capture test: it needs root, iproute2 and iptables, and builds network
# namespaces. Those tests are #[ignore]d there and run here, where the tools are installed.

.PHONY: test-init iptables-tools

TEST_TARGETS += test-init

# Debian packages the capture tests need (iptables brings the nft and legacy backends).
IPTABLES_TOOLS := iptables-nft-restore iptables-legacy-restore ip6tables-nft-restore ip

iptables-tools: ## install iptables and iproute2 if missing (idempotent, needs root)
	@missing=""; for tool in $(IPTABLES_TOOLS); do \
	  command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing iptables and iproute2 (missing:$$missing)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables iproute2; \
	fi

test-init: iptables-tools ## the iptables rules in real network namespaces with real traffic (root)
	@[ "$$(id -u)" = 0 ] || { echo "test-init needs root (it creates network namespaces)" >&2; exit 1; }
	$(CARGO) test -p tandem-init --locked --test capture_in_netns -- --ignored
