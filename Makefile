# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_WORKSPACE ?= workspace/demo
# Test processes (pytest-xdist): the suite is mostly single-threaded Python and process
# start-ups, so two keep both cores busy. Each takes whole files (--dist loadfile), so a
# file's module fixtures are built once. `make test PYTEST_WORKERS=0` runs in one process.
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile

LOWEST_VENV := .venv-lowest

.PHONY: venv demo test test-fast test-lowest browser clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

## demo: create the environment, then run the whole pipeline on the committed sample world
# --db names the workspace's own SQLite file, so that a RECSYS_DB exported in the shell (a
# production store) is not where the sample goes; the demo refuses a store holding other data.
demo: $(STAMP)
	$(VENV)/bin/recsys --workspace $(DEMO_WORKSPACE) --db sqlite:///$(abspath $(DEMO_WORKSPACE))/recsys.db demo

## test: create the environment (and headless Chromium for the report test), run every test
test: $(STAMP) browser
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow and not browser and not ray"

## test-lowest: the fast tests on the lowest version of every dependency that pyproject.toml
## allows (uv's lowest-direct resolution, in .venv-lowest): the declared lower bounds are tested.
test-lowest:
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install --quiet 'uv>=0.5'
	$(LOWEST_VENV)/bin/uv pip install --quiet --python $(LOWEST_VENV)/bin/python --resolution lowest-direct -e '.[test]'
	$(LOWEST_VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m "not slow and not browser and not ray"

# The report's browser test needs Debian's chromium and chromedriver.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "chromium/chromedriver missing and not root: the browser test will skip (and fail under CI=true)"; \
	  fi; \
	fi

clean:
	rm -rf $(VENV) $(LOWEST_VENV) workspace .pytest_cache
