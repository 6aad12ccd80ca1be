# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch and torchvision are pinned to the builds that lie on this machine's disk.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow lint format venv browser clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[test]' $(TORCH_PINS)
	touch $(STAMP)

venv: $(STAMP)

# Debian's chromium drives the explorer's browser test (never `playwright install`).
browser:
	@command -v chromium >/dev/null 2>&1 || test -x /usr/bin/chromium || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	    || echo "chromium could not be installed: browser tests will be skipped"; }

demo: $(STAMP)
	$(VENV)/bin/featurelens demo --out featurelens-demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

test: $(STAMP) browser lint
	$(PY) -m pytest -n 2 -q

test-slow: $(STAMP) browser
	$(PY) -m pytest -n 2 -q -m slow

clean:
	rm -rf $(VENV) featurelens-demo .pytest_cache
