# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
# Where the development environment lives; `make VENV=/tmp/other-venv test` builds another one.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch and torchvision are pinned to the builds that lie on this machine's disk.
TORCH_PIN := torch==2.14.1
TORCHVISION_PIN := torchvision==0.29.1
TORCH_PINS := $(TORCH_PIN) $(TORCHVISION_PIN)

.PHONY: demo test test-slow wheel-smoke lint format venv browser clean

# Every extra (vision, figures, demo, serve) and the test tools, editable.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[all,test]' $(TORCH_PINS)
	touch $(STAMP)

venv: $(STAMP)

# Debian's chromium drives the explorer's browser test (never `playwright install`).
browser:
	@command -v chromium >/dev/null 2>&1 || test -x /usr/bin/chromium || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	    || echo "chromium could not be installed: browser tests will be skipped"; }

demo: $(STAMP)
	$(VENV)/bin/featurelens demo --out featurelens-demo

# ruff: style, imports and numpy-style docstrings on every public name (pyproject's
# [tool.ruff.lint]); mypy: the package's types ([tool.mypy]).
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

test: $(STAMP) browser lint
	$(PY) -m pytest -n 2 -q

test-slow: $(STAMP) browser
	$(PY) -m pytest -n 2 -q -m slow

# The package as a user gets it (about 3 minutes): the sdist, the wheel built from it, a fresh
# venv outside the source tree with the wheel's 'demo' extra, `featurelens demo --quick` there,
# then tests run from the unpacked sdist. Temporary files go under $TMPDIR and are removed.
wheel-smoke: $(STAMP)
	PY='$(abspath $(PY))' PYTHON='$(PYTHON)' TORCH_PIN='$(TORCH_PIN)' bash .ci/wheel-smoke

clean:
	rm -rf $(VENV) featurelens-demo .pytest_cache build dist
