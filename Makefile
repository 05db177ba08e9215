# Two commands do all the set-up on a fresh machine with Python >= 3.11:
#   make demo   - install into .venv, run the main job on the synthetic default, print the leaderboard
#   make test   - install into .venv (with test extras) and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_METHODS ?= cam

.PHONY: install demo test test-fast clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/wsss-bench run --methods $(DEMO_METHODS) --dataset synthetic --seeds 0

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not integration"

clean:
	rm -rf results .pytest_cache
