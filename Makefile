# Two commands set up a fresh machine: `make run` and `make test`. Both install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test unit integration lint bench e2e clean deps

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

unit: install
	$(BIN)/python -m pytest tests/unit -q

integration: install deps
	$(BIN)/python -m pytest tests/integration -q

test: install deps
	$(BIN)/ruff check syncmesh_plugin tests
	$(BIN)/python -m pytest tests/unit tests/integration -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
