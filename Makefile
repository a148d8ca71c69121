# ramp-broker developer commands. Needs only Python 3.11+ and the package registries (make test:
# also Node.js 20+ and npm, for tests/mcp_ts).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run gen check-gen lint tools ts-client test bench bench-purchases bench-layers bench-budget bench-scaleout bench-cluster bench-pacing clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

## setup: create .venv and install the broker with its development tools
setup: $(STAMP)

## run: start the reference Exchange and the broker with the example configs (Ctrl-C stops both)
run: setup
	@$(BIN)/ramp-broker exchange --catalog examples/catalog.yaml & ex=$$!; \
	trap 'kill $$ex 2>/dev/null; wait $$ex 2>/dev/null' EXIT INT TERM; \
	$(BIN)/ramp-broker serve --config examples/broker.yaml

## gen: regenerate the ramp/ package from proto/
gen: setup
	$(BIN)/python tools/genproto.py

## check-gen: fail if the committed ramp/ package is stale
check-gen: setup
	$(BIN)/python tools/genproto.py --check

## lint: ruff and mypy (strict)
lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

## tools: make sure redis-server, redis-cli, redis-benchmark and promtool are installed (tests start their own Redis, on loopback)
tools:
	@tools/ensure-tools.sh

## ts-client: install the TypeScript MCP SDK client the tests drive `ramp-broker mcp` with (tests/mcp_ts; needs node 20+ and npm)
TS_CLIENT := tests/mcp_ts
ts-client: $(TS_CLIENT)/node_modules/.installed

$(TS_CLIENT)/node_modules/.installed: $(TS_CLIENT)/package.json $(TS_CLIENT)/package-lock.json
	@node -e 'process.exit(Number(process.versions.node.split(".")[0]) < 20 ? 1 : 0)' 2>/dev/null && command -v npm >/dev/null \
	  || { echo "make test needs Node.js 20+ and npm on PATH (tests/test_mcp_ts.py drives the MCP server" \
	            "with the TypeScript SDK's client): install them, then run make test again" >&2; exit 1; }
	cd $(TS_CLIENT) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

## test: everything CI runs: generated code fresh, lint, types, the whole test suite
test: check-gen lint tools ts-client
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

## bench: the six benchmarks below (bench/README.md explains what each prints)
bench: bench-purchases bench-layers bench-budget bench-scaleout bench-cluster bench-pacing

## bench-purchases: purchases/s and latency through the broker, per protocol
bench-purchases: setup
	$(BIN)/python -m bench.purchases

## bench-layers: the broker's CPU per purchase for each budget layer, in process, without the HTTP server (about 1 minute)
bench-layers: setup
	$(BIN)/python -m bench.layers $(LAYERS_ARGS)

## bench-budget: the Redis store against redis-benchmark, and what the period layer adds per purchase
bench-budget: setup tools
	$(BIN)/python -m bench.budget

## bench-scaleout: 1, 2 and 4 brokers on one Redis spend one budget to exhaustion, strict vs lease mode
# (make bench-scaleout SCALEOUT_ARGS="--quick --json": about 2 minutes on 2 cores, one JSON object per line)
bench-scaleout: setup tools
	$(BIN)/python -m bench.scaleout $(SCALEOUT_ARGS)

## bench-cluster: the store on one Redis against a 3-primary Redis Cluster, and the cost of wait_replicas (about 1 minute)
bench-cluster: setup tools
	$(BIN)/python -m bench.cluster $(CLUSTER_ARGS)

## bench-pacing: paced budgets at 2x, 4x and 10x demand (and 2 lease brokers): where each ran out, how far off its even curve (1-2 minutes)
bench-pacing: setup
	$(BIN)/python -m bench.pacing $(PACING_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis $(TS_CLIENT)/node_modules
