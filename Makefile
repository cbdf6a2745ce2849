# The commands people type. `make help` lists them.
SHELL := bash
.DEFAULT_GOAL := help
CARGO ?= cargo

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

.PHONY: build
build: ## Build every crate (release)
	$(CARGO) build --release --workspace

.PHONY: run
run: ## Run a local fleet: redis-server + 3 servers on loopback (Ctrl-C stops it)
	scripts/run-fleet.sh

.PHONY: lint
lint: ## Formatting and clippy, warnings are errors
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

.PHONY: test
test: lint ## Every test: unit, real-process server tests, control-plane tests
	$(CARGO) test --workspace

.PHONY: bench
bench: ## Benchmarks (not part of `make test`); figures in bench/results/ and bench/README.md
	scripts/install-deps.sh
	bench/history.sh
