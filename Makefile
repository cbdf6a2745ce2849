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
run: ## The main job: a real node, the chart's operator and a WebSocketCluster you can connect to (Ctrl-C stops it)
	scripts/install-deps.sh
	scripts/run.sh

.PHONY: fleet
fleet: ## Only the data plane: redis-server + 3 servers on loopback (Ctrl-C stops it)
	scripts/run-fleet.sh

.PHONY: lint
lint: ## Formatting and clippy, warnings are errors
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

.PHONY: test
test: ## Every test: lint, unit, real-process server tests, the JavaScript client, the control-plane tests, the node tests
	@scripts/timed.sh "lint" $(MAKE) --no-print-directory lint
	@scripts/timed.sh "unit and real-process tests" $(CARGO) test --workspace --exclude wsfleet-e2e
	@scripts/timed.sh "JavaScript client (unit, real fleet, headless Chromium)" $(MAKE) --no-print-directory test-js
	@scripts/timed.sh "control-plane tests (kwok profile)" $(MAKE) --no-print-directory test-cluster
	@scripts/timed.sh "node tests (real kubelet)" $(MAKE) --no-print-directory test-node

.PHONY: test-js
test-js: ## The JavaScript client (clients/js): state-machine tests, a real fleet, the demo page in headless Chromium
	$(CARGO) build -p wsfleet-server --bin wsfleet-server
	cd clients/js && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build
	@# Each stage is bounded; the tests stop every process they start, also when one fails.
	cd clients/js && timeout --signal=TERM 120 node --test --test-timeout=30000 test/unit/
	cd clients/js && WSFLEET_SERVER_BIN=$${CARGO_TARGET_DIR:-$(CURDIR)/target}/debug/wsfleet-server \
		timeout --signal=TERM 300 node --test --test-concurrency=1 --test-timeout=90000 test/fleet/ test/browser/

.PHONY: generate
generate: ## Regenerate crds/ and the chart's copy from the Rust types (tests fail when they drift)
	$(CARGO) run -q -p wsfleet-operator --bin crdgen > crds/websocketcluster.yaml
	cp crds/websocketcluster.yaml charts/wsfleet/files/crds/websocketcluster.yaml

.PHONY: bench
bench: ## Benchmarks (not part of `make test`); figures in bench/results/ and bench/README.md
	scripts/install-deps.sh
	bench/history.sh
	bench/connections.sh

.PHONY: chaos
chaos: ## The fault run: Redis killed, paused, put to sleep, cut, restored under traffic; stalled clients; a channel flood
	scripts/install-deps.sh
	bench/chaos.sh

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

.PHONY: images
images: ## Build the server, operator, Redis and pause images (no Docker); import them when the node runs
	scripts/install-deps.sh
	images/build.sh
	tests/cluster/node/import-images.sh

.PHONY: node-up
node-up: ## Start (or reuse) the real node: kubelet + containerd, images imported, the chart installed
	scripts/install-deps.sh
	tests/cluster/node/up.sh

.PHONY: node-down
node-down: ## Stop the node and remove all it made; fails unless the machine is left as it was found
	tests/cluster/node/down.sh

.PHONY: node-env
node-env: ## Print KUBECONFIG and PATH exports for the node: eval "$$(make -s node-env)"
	@tests/cluster/node/env.sh

.PHONY: test-node
test-node: ## End-to-end tests on the real node (wsfleet-e2e --test node); starts and stops it unless already up
	@# A hung test fails the run (and the node still comes down) instead of holding CI.
	tests/cluster/node/with-node.sh timeout --signal=TERM 1200 $(CARGO) test -p wsfleet-e2e --features node-profile --test node
