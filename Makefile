# Tandem: the commands a person types. `make help` lists them.
#
# Each component adds its own targets in mk/<component>.mk and appends the targets that
# `make test` must run to TEST_TARGETS (and, for the local cluster, E2E_TARGETS).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
# Heavy, version-keyed builds (Kubernetes binaries, tools) live outside the clone.
TANDEM_CACHE ?= $(HOME)/.cache/tandem
export TANDEM_CACHE

TEST_TARGETS :=
E2E_TARGETS :=

-include mk/*.mk

.PHONY: help fmt lint unit crds crds-check test

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | sort | \
	  awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

fmt: ## format every crate
	$(CARGO) fmt --all

lint: ## rustfmt check and clippy with warnings denied
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit: ## unit and integration tests of every crate
	$(CARGO) test --workspace --locked

test: lint crds-check unit $(TEST_TARGETS) $(E2E_TARGETS) ## every test: lints, generated files, unit, integration, local cluster
	@echo "make test: all green"

crds: ## regenerate manifests/crds/*.yaml and manifests/proxy-config.schema.json from the Rust types
	$(CARGO) run -q -p tandem-crds --bin tandem-crdgen -- manifests

crds-check: ## fail when the checked-in generated API files are stale
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; mkdir -p $$tmp/crds; \
	$(CARGO) run -q -p tandem-crds --bin tandem-crdgen -- $$tmp; \
	diff -ru manifests/crds $$tmp/crds && diff -u manifests/proxy-config.schema.json $$tmp/proxy-config.schema.json \
	  || { echo "generated API files are stale: run 'make crds' and commit"; exit 1; }
