# kind: the same scenarios on a real cluster with Docker (not available on the CI machine,
# where `make e2e` runs them on the local control plane instead). The script is still checked
# statically by `make test` (shellcheck), so it cannot rot unnoticed.

.PHONY: e2e-kind images shellcheck

e2e-kind: ## end-to-end scenarios on a kind cluster (needs Docker and kind; KEEP=1 keeps it)
	tests/kind/e2e.sh

images: ## build the proxy, operator, webhook and test-app images (needs Docker)
	@command -v docker >/dev/null && docker info >/dev/null 2>&1 || { echo "make images needs a Docker engine" >&2; exit 1; }
	docker build --target proxy -t tandem-proxy:0.1.0 .
	docker build --target operator -t tandem-operator:0.1.0 .
	docker build --target webhook -t tandem-webhook:0.1.0 .
	docker build --target testapp -t tandem-testapp:dev .

SHELL_SCRIPTS := $(wildcard tests/kind/*.sh tests/k8s/*.sh tests/jaeger/*.sh tests/demo/*.sh bench/*.sh)

shellcheck: ## static check of the shell scripts (installs shellcheck once)
	@command -v shellcheck >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck; }
	shellcheck $(SHELL_SCRIPTS)

TEST_TARGETS += shellcheck
