# Two commands do all the set-up on a fresh machine with Python >= 3.11:
#   make demo   - install into .venv, run the main job on the synthetic default, print the leaderboard
#   make test   - install into .venv (with test extras) and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_METHODS ?= weaktr,afa,adcam

.PHONY: install demo test test-fast clean reports

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

# The committed reports: every method of the synthetic and voc-mini suites, 3 seeds each.
reports: $(STAMP)
	$(BIN)/wsss-bench run --suite synthetic --methods cam,weaktr,afa,adcam --seeds 0,1,2 || true
	$(BIN)/wsss-bench report --suite synthetic --out reports/synthetic
	$(BIN)/wsss-bench run --suite voc-mini --methods cam,weaktr,afa,adcam --seeds 0,1,2 || true
	$(BIN)/wsss-bench report --suite voc-mini --out reports/voc-mini
