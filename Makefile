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
run: ## The main job: local fleet + control plane + operator + a WebSocketCluster (Ctrl-C stops it)
	scripts/install-deps.sh
	scripts/run.sh

.PHONY: fleet
fleet: ## Only the data plane: redis-server + 3 servers on loopback (Ctrl-C stops it)
	scripts/run-fleet.sh

.PHONY: lint
lint: ## Formatting and clippy, warnings are errors
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

.PHONY: test
test: lint ## Every test: unit, real-process server tests, then the control-plane tests
	$(CARGO) test --workspace --exclude wsfleet-e2e
	$(MAKE) test-cluster

.PHONY: generate
generate: ## Regenerate crds/ and the chart's copy from the Rust types (tests fail when they drift)
	$(CARGO) run -q -p wsfleet-operator --bin crdgen > crds/websocketcluster.yaml
	cp crds/websocketcluster.yaml charts/wsfleet/files/crds/websocketcluster.yaml

.PHONY: bench
bench: ## Benchmarks (not part of `make test`); figures in bench/results/ and bench/README.md
	scripts/install-deps.sh
	bench/history.sh
	bench/connections.sh

.PHONY: bench-operator
bench-operator: ## The operator with 1,000 WebSocketClusters on the local control plane (CLUSTERS=N for fewer)
	scripts/install-deps.sh
	bench/operator.sh

.PHONY: cluster-up
cluster-up: ## Start (or reuse) the local Kubernetes control plane on 127.0.0.1; first run builds it
	tests/cluster/up.sh

.PHONY: cluster-down
cluster-down: ## Stop the local control plane, every process by its pid
	tests/cluster/down.sh

.PHONY: cluster-env
cluster-env: ## Print KUBECONFIG and PATH exports for it: eval "$(make -s cluster-env)"
	@tests/cluster/env.sh

.PHONY: test-cluster
test-cluster: ## Control-plane tests (wsfleet-e2e); starts and stops the cluster unless already up
	$(CARGO) build -p wsfleet-operator -p wsfleet-server --bins
	tests/cluster/build-helm.sh > /dev/null
	tests/cluster/with-cluster.sh $(CARGO) test -p wsfleet-e2e
