#!/usr/bin/env bash
# Create (idempotently) the venv the vLLM conformance tier runs in, outside the clone:
#   ${QCONVERT_ENGINES_DIR:-$HOME/.cache/qconvert/engines}/vllm-0.33.0
# The released vLLM wheel is installed WITHOUT its dependencies (they pull CUDA builds of torch, flashinfer,
# cutlass, ...): the venv reuses the machine's CPU torch (--system-site-packages; `make setup` installs
# torch==2.13.0, the CPU build) and gets exactly the pure-Python / CPU-wheel packages vLLM's imports need, with
# compressed-tensors and transformers at the versions vLLM 0.33.0 declares. The last line printed is the venv's
# python. A warm run (venv present, marker matching the pins) takes well under a second.
set -euo pipefail

VLLM_VERSION=0.33.0
PYTHON=${PYTHON:-python3}
ROOT=${QCONVERT_ENGINES_DIR:-$HOME/.cache/qconvert/engines}
VENV="$ROOT/vllm-$VLLM_VERSION"

# What vLLM 0.33.0's import of its config, distributed, model-loader, compressed-tensors and Llama/DeepSeek model
# modules needs on a CPU, beyond qconvert's own dependencies (found by importing them; pins where vLLM pins).
VLLM_PURE_DEPS=(
  "compressed-tensors==0.17.0" "transformers>=5.16.1,<5.21.0"
  "pyzmq>=25.0.0" "cbor2" "oss-harmony>=0.0.11" "openai>=2.25.0" "pillow>=13.0.0" "pybase64" "cachetools"
  "msgspec" "uvloop" "xgrammar==0.2.8" "apache-tvm-ffi==0.1.11" "fastapi>=0.133.0,<0.137.0" "starlette>=1.0.1"
  "partial-json-parser" "llguidance>=1.7.0,<1.8.0" "einops" "py-cpuinfo" "pyyaml" "jinja2" "markupsafe"
  "cloudpickle" "prometheus-client>=0.18.0" "psutil" "regex" "requests>=2.33.0" "certifi" "charset-normalizer"
  "idna" "urllib3" "aiohttp>=3.14.4" "aiohappyeyeballs" "aiosignal" "attrs" "frozenlist" "multidict>=6.9.1"
  "propcache" "yarl" "pydantic>=2.12.0" "pydantic-core" "annotated-types" "annotated-doc" "typing-inspection"
  "typing-extensions>=4.10" "anyio" "sniffio" "h11" "httpx" "httpcore" "distro" "jiter" "orjson>=3.11.6"
  "filelock>=3.20.3" "opentelemetry-api>=1.27.0" "opentelemetry-sdk>=1.27.0"
  "opentelemetry-semantic-conventions" "importlib-metadata" "zipp" "blake3" "tokenizers>=0.23.2" "numpy"
  "safetensors>=0.6.2" "huggingface-hub>=1.31.0" "tqdm" "packaging" "sentencepiece" "tiktoken" "setuptools"
)
QCONVERT_DEPS=("safetensors" "typer" "tqdm" "huggingface_hub" "pytest")
MARKER="vllm==$VLLM_VERSION ${VLLM_PURE_DEPS[*]} ${QCONVERT_DEPS[*]}"

if [[ -x "$VENV/bin/python" && -f "$VENV/.qconvert-pins" && "$(cat "$VENV/.qconvert-pins")" == "$MARKER" ]]; then
  echo "$VENV/bin/python"
  exit 0
fi

echo "setting up vLLM $VLLM_VERSION in $VENV" >&2
rm -rf "$VENV"
mkdir -p "$ROOT"
"$PYTHON" -m venv --system-site-packages "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# The CPU torch: the machine's when it has one, else the pinned CPU build (never an unpinned, CUDA torch).
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" --no-deps "vllm==$VLLM_VERSION"
"${PIP[@]}" --no-deps "${VLLM_PURE_DEPS[@]}"
"${PIP[@]}" "${QCONVERT_DEPS[@]}"
# Fail here, with vLLM's own message, if the engine cannot be imported the way the tier uses it.
VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" -c "
import vllm.config, vllm.distributed
import vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors
import vllm.model_executor.models.llama, vllm.model_executor.models.deepseek_v2
import vllm.model_executor.model_loader.default_loader
" >&2
echo "$MARKER" > "$VENV/.qconvert-pins"
echo "$VENV/bin/python"
