# Two commands do all the set-up on a fresh machine with Python 3.11 (Linux x86_64):
#   make demo   - install into .venv, run the main job on the synthetic default, print the leaderboard
#   make test   - install into .venv (with test extras) and run the test suite
# Both install the exact versions in requirements.lock (`make lock` regenerates it).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
LOCK := requirements.lock
DEMO_METHODS ?= weaktr,afa,adcam

.PHONY: install demo test test-fast clean reports lock

# The lock holds versions resolved for this interpreter and platform; elsewhere a pinned
# version may have no wheel, and numbers may differ from the committed reports.
LOCKED_FOR := 3.11 Linux x86_64
PLATFORM = $(shell $(PY) -c 'import platform; print(".".join(platform.python_version_tuple()[:2]), platform.system(), platform.machine())')

$(STAMP): pyproject.toml $(LOCK)
	@[ "$(PLATFORM)" = "$(LOCKED_FOR)" ] || echo "warning: $(LOCK) is for Python $(LOCKED_FOR); $(PY) is Python $(PLATFORM)"
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check  # fails when pyproject.toml asks for something the lock lacks: run `make lock`
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/wsss-bench run --methods $(DEMO_METHODS) --dataset synthetic --seeds 0 --max-parallel 2 --cpus-per-trial 1

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not integration"

clean:
	rm -rf results .pytest_cache

# Regenerate requirements.lock: resolve pyproject.toml (with the test extras) into a fresh
# venv, newest versions the configured package index allows, and freeze it. Review the diff
# (a new torch changes the numbers), then regenerate the committed reports (make reports).
LOCK_VENV ?= $(or $(TMPDIR),/tmp)/wsss-bench-lock-venv
lock:
	@[ "$(PLATFORM)" = "$(LOCKED_FOR)" ] || { echo "error: make lock needs Python $(LOCKED_FOR) (PY=...); $(PY) is Python $(PLATFORM)"; exit 2; }
	rm -rf $(LOCK_VENV)
	$(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet -e '.[test]'
	sed -n '/^#/p' $(LOCK) > $(LOCK).new
	$(LOCK_VENV)/bin/python -m pip freeze --exclude-editable >> $(LOCK).new
	@# registry names and versions only: a local path or URL would not install anywhere else
	@! grep -v '^#' $(LOCK).new | grep -vE '^[A-Za-z0-9_.-]+==[A-Za-z0-9_.+!-]+$$' || { echo "error: $(LOCK).new has the lines above (not name==version)"; exit 1; }
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)

# The committed reports (reports/synthetic, reports/synthetic-pretrained, reports/voc-mini):
# every method of the synthetic suite over 3 seeds plus the papers' ablations and IRN, the same
# rows from synthetic-pretrained backbones (SYN_PRE; IRN left out), and every method on voc-mini over 3 seeds
# (a voc-mini trial is 26-58 min on one CPU core, two at a time: about 1 h 25 min per seed on 2
# cores; VOC_SEEDS=0 gives the committed single-seed report). `|| true`: a failed trial is
# listed in the report rather than stopping it.
RUN := $(BIN)/wsss-bench run --max-parallel 2 --cpus-per-trial 1
VOC_SEEDS ?= 0,1,2
SYN_PRE := pretrained=synthetic seg_pretrained=synthetic
reports: $(STAMP)
	$(RUN) --suite voc-mini --methods cam,weaktr,afa,adcam --seeds $(VOC_SEEDS) || true
	$(RUN) --suite synthetic --methods cam,weaktr,afa,adcam --seeds 0,1,2 || true
	$(RUN) --suite synthetic --methods weaktr --seeds 0,1,2 weaktr.aaf=false || true
	$(RUN) --suite synthetic --methods adcam --seeds 0,1,2 adcam.refine_mode=diffusion_only || true
	$(RUN) --suite synthetic --methods adcam --seeds 0,1,2 adcam.refine_mode=plain_cam || true
	$(RUN) --suite synthetic --methods afa --seeds 0,1,2 afa.par_iters=0 || true
	$(RUN) --suite synthetic --methods afa --seeds 0,1,2 afa.pseudo_mask_mode=par || true
	$(RUN) --suite synthetic --methods cam,weaktr,afa,adcam --seeds 0,1,2 eval.refine=irn || true
	$(RUN) --suite synthetic --methods cam,weaktr,afa,adcam --seeds 0,1,2 $(SYN_PRE) || true
	$(RUN) --suite synthetic --methods weaktr --seeds 0,1,2 $(SYN_PRE) weaktr.aaf=false || true
	$(RUN) --suite synthetic --methods adcam --seeds 0,1,2 $(SYN_PRE) adcam.refine_mode=diffusion_only || true
	$(RUN) --suite synthetic --methods adcam --seeds 0,1,2 $(SYN_PRE) adcam.refine_mode=plain_cam || true
	$(RUN) --suite synthetic --methods afa --seeds 0,1,2 pretrained=synthetic afa.par_iters=0 || true
	$(RUN) --suite synthetic --methods afa --seeds 0,1,2 pretrained=synthetic afa.pseudo_mask_mode=par || true
	$(BIN)/wsss-bench report --suite synthetic --filter "params.\`method.pretrained\` = 'None'" --out reports/synthetic
	$(BIN)/wsss-bench report --suite synthetic --filter "params.\`method.pretrained\` = 'synthetic'" --out reports/synthetic-pretrained
	$(BIN)/wsss-bench report --suite voc-mini --out reports/voc-mini
