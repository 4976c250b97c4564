# tandem-proxy's resilience engine (proxy/src/policy). Its unit tests and the loopback
# integration tests (proxy/tests/proxy_resilience.rs) run under `make unit` with the workspace.

.PHONY: bench-policy

bench-policy: ## CPU cost of the policy engine per request (select + record), 1 and N threads
	$(CARGO) bench -p tandem-proxy --locked --bench policy
