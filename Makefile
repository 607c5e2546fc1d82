# Two commands set up a fresh machine: `make run` and `make test`. Both install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test unit integration lint typecheck bench e2e clean deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The distribution's etcd server when no etcd binary is on PATH (embedded mode and the tests need it).
deps:
	@command -v etcd >/dev/null 2>&1 || { \
	  echo "installing etcd-server (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server) >/dev/null; }

run: install deps
	$(BIN)/syncmesh-plugin serve $(if $(CONFIG),--config $(CONFIG),)

lint: install
	$(BIN)/ruff check syncmesh_plugin tests

# Static types of the package ([tool.mypy] in pyproject.toml).
typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/python -m pytest tests/unit -q

integration: install deps
	$(BIN)/python -m pytest tests/integration -q

test: install deps
	$(BIN)/ruff check syncmesh_plugin tests
	$(BIN)/mypy
	$(BIN)/python -m pytest tests/unit tests/integration -q -p no:cacheprovider

# Convergence benchmarks, syncmesh and Syncthing side by side (BENCH_ARGS="--quick", "--only 6,7").
bench: install deps
	@command -v syncthing >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq syncthing >/dev/null; }
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# ---- Docker packaging and end-to-end tests (see plugin/build.sh, tests/e2e/)
PLUGIN_NAME ?= syncmesh/syncmesh-plugin
PLUGIN_VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' syncmesh_plugin/__init__.py)
PLUGIN_REF := $(PLUGIN_NAME):$(PLUGIN_VERSION)
DOCKER ?= docker
# e.g. make plugin-enable PLUGIN_SETTINGS="SYNCMESH_ETCD_ENDPOINTS=http://10.0.0.5:2379 SYNCMESH_NODE_ID=n1"
PLUGIN_SETTINGS ?=
E2E_APT := docker.io:dockerd busybox-static:busybox mmdebstrap:mmdebstrap iproute2:ip iptables:iptables etcd-server:etcd \
	docker-registry:docker-registry

.PHONY: plugin plugin-enable plugin-push e2e-deps

# plugin/dist = config.json + rootfs/ (Debian bookworm python3 via mmdebstrap + our wheel), then
# `docker plugin create $(PLUGIN_REF) plugin/dist`. The Debian base is cached in plugin/cache/.
plugin: install
	@command -v mmdebstrap >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null; }
	PLUGIN_NAME=$(PLUGIN_NAME) DOCKER="$(DOCKER)" PYTHON=$(CURDIR)/$(BIN)/python plugin/build.sh

plugin-enable:
	-@$(DOCKER) plugin disable -f $(PLUGIN_REF) >/dev/null 2>&1
	$(if $(strip $(PLUGIN_SETTINGS)),$(DOCKER) plugin set $(PLUGIN_REF) $(PLUGIN_SETTINGS),)
	$(DOCKER) plugin enable --timeout 120 $(PLUGIN_REF)
	$(DOCKER) plugin ls

# PLUGIN_NAME must name a repository on a registry you are logged in to (registry/org/syncmesh).
plugin-push:
	$(DOCKER) plugin push $(PLUGIN_REF)

# $(call apt_need,package:command ...): apt-get install the packages whose command is missing.
apt_need = need=""; for p in $(1); do command -v $${p\#*:} >/dev/null 2>&1 || need="$$need $${p%%:*}"; done; \
	if [ -n "$$need" ]; then echo "apt-get install$$need"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null; fi

e2e-deps:
	@$(call apt_need,$(E2E_APT))

# Private dockerds (each in its own network and mount namespace; a host engine is left alone), legacy and
# managed plugin, two hosts in network namespaces, a three-node Swarm (stack deploy, drain, plugin upgrade
# from a local docker-registry). Fails if the host's links, routes, iptables, mounts,
# /run/docker/plugins or its engine's objects differ afterwards (tests/hostguard.py). Needs root. Not part
# of `make test`.
e2e: install e2e-deps
	$(BIN)/python -m pytest tests/e2e -m e2e -v -p no:cacheprovider $(E2E_ARGS)

# Property-based fuzzing (hypothesis) of path validation, manifest decoding, the Docker protocol
# handlers and the API/peer request parsing. `make test` runs the same tests briefly (profile ci).
FUZZ_PROFILE ?= fuzz
.PHONY: fuzz
fuzz: install
	HYPOTHESIS_PROFILE=$(FUZZ_PROFILE) $(BIN)/python -m pytest tests/unit -m fuzz -q -p no:cacheprovider \
	  --timeout 900 $(FUZZ_ARGS)

# Fault-injection suite (tests/chaos, root): writers on 3 nodes, one fault per scenario, then the
# invariants (identical trees, no completed write lost). Prints a table. Not part of `make test`.
CHAOS_SEEDS ?= 3
# the partitions (ip, nsenter, iptables) and the host guard (ip, iptables-save; tests/hostguard.py)
CHAOS_APT := iproute2:ip iptables:iptables-save util-linux:nsenter
.PHONY: chaos chaos-short chaos-deps
chaos-deps:
	@$(call apt_need,$(CHAOS_APT))

chaos: install deps chaos-deps
	$(BIN)/python tests/chaos/run.py --seeds $(CHAOS_SEEDS) $(CHAOS_ARGS)

chaos-short: install deps chaos-deps
	$(BIN)/python tests/chaos/run.py --short $(CHAOS_ARGS)

# Scale benchmark (issue 9): a 1,000,000-file volume (publish, join, restart, 1,000 edits), twelve nodes and a
# 512 MiB file, 200 volumes on one node, etcd footprint under steady edits, the inotify watch limit. Real etcd
# and daemons as processes; prints a table and writes benchmarks/results/scale.json (38 minutes measured).
# SCALE_ARGS="--quick" for a 2-minute smoke run, "--only 1 --files 100000" for one scenario.
.PHONY: scale
scale: install deps
	$(BIN)/python benchmarks/scale.py $(SCALE_ARGS)
