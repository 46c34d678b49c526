#!/usr/bin/env bash
# Create (idempotently) the SGLang conformance-tier venv OUTSIDE the clone and print its python on the last line.
#
# SGLang 0.5.23's wheel declares CUDA-only dependencies (sglang-kernel, flashinfer, cuda-python, deep-gemm,
# torch 2.14.1 with CUDA ...). None of them is needed to import the code the tier drives (quantization configs
# and methods, linear/MoE layers, the Llama and DeepSeek model classes, the model loader), so the wheel is
# installed with --no-deps, plus exactly the pure-Python packages those imports need. torch is the machine's
# CPU build (2.13), shared through --system-site-packages. torchvision (imported by sglang.srt.configs for
# multimodal preprocessing) exists on PyPI only as CUDA builds: its C extension cannot load on CPU torch, and
# the harness defines the two operator schemas its pure-Python import registers fakes for (see
# tests/engines/sglang_harness.py).
set -euo pipefail

SGLANG_VERSION=0.5.23
PYTHON=${PYTHON:-python3}
ROOT=${QCONVERT_ENGINES_DIR:-$HOME/.cache/qconvert/engines}
VENV=$ROOT/sglang-$SGLANG_VERSION
# Everything that decides the venv's content: change any pin and the venv is rebuilt.
NO_DEPS=(sglang==$SGLANG_VERSION torchvision==0.28.0 compressed-tensors==0.18.0 transformers==5.19.0)
WITH_DEPS=(pybase64==1.5.1 pillow msgspec==0.22.0 pyzmq starlette dill sentencepiece==0.2.1 gguf==0.19.0
           einops==0.8.2 openai==2.8.0 partial_json_parser apache-tvm-ffi==0.1.11
           safetensors typer tqdm huggingface_hub pytest)
MARKER="python=$($PYTHON -c 'import sys; print(sys.version.split()[0])') ${NO_DEPS[*]} ${WITH_DEPS[*]}"

if [ -f "$VENV/.qconvert-marker" ] && [ "$(cat "$VENV/.qconvert-marker")" = "$MARKER" ] \
   && [ -x "$VENV/bin/python" ]; then
    echo "$VENV/bin/python"
    exit 0
fi

echo "building $VENV (cold: a few minutes)" >&2
rm -rf "$VENV"
mkdir -p "$ROOT"
"$PYTHON" -m venv --system-site-packages "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# The CPU torch first where the machine has none (the Makefile's setup does the same for the default tier).
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" torch==2.13.0
"${PIP[@]}" --no-deps "${NO_DEPS[@]}"
"${PIP[@]}" "${WITH_DEPS[@]}"
# Fail here, not in the tests, when the import chain the harness needs is broken.
PYTHONPATH=$(cd "$(dirname "$0")/../.." && pwd) "$VENV/bin/python" -c \
    "import tests.engines.sglang_harness as h; h.import_sglang()" >&2
echo "$MARKER" > "$VENV/.qconvert-marker"
echo "$VENV/bin/python"
