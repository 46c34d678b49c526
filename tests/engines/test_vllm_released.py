"""Released quantized checkpoints (ModelOpt NVFP4 and FP8) as vLLM 0.33 reads them, against what qconvert makes of them;
and the exact casts of MXFP4 (to NVFP4, to fp8 blocks) loaded by vLLM.

The release fixtures (tests/released_fixtures.py, a Llama and a Qwen3-MoE) are loaded by vLLM's own ModelOpt
methods and qconvert's compressed-tensors outputs by vLLM's compressed-tensors methods, with the harness's
stubs (kernel selection only: the capability query is patched, no kernel runs). Then, parameter by parameter:

* ``quantize -s nvfp4`` on ModelOpt NVFP4 is a re-layout: vLLM's loaded codes and block scales are the same bytes,
  its global scale the float32 inverse of the release's ``weight_scale_2``;
* ``convert --op dequantize`` (qconvert's reader) equals vLLM's own dequantization of what its ModelOpt loader
  loaded: ``dequantize_to_dtype`` (its NVFP4 emulation) and ``fp8 x weight_scale`` per fused shard.

Run in the vLLM venv: ``make engines``; skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from qconvert.cli import main as qconvert_main
from tests.engines import vllm_harness as harness
from tests.engines.sources import build_vllm_source
from tests.released_fixtures import read_tensors, to_modelopt_fp8, to_modelopt_nvfp4

_REASON = harness.unavailable_reason()
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)

RESULTS: list[harness.Result] = []
RELEASES = {"nvfp4": to_modelopt_nvfp4, "fp8": to_modelopt_fp8}
# fp8: per channel (vLLM's compressed-tensors FP8 MoE method takes no per-tensor weights)
OUR_SCHEME = {"nvfp4": "nvfp4", "fp8": "fp8"}
CAPABILITY = {"nvfp4": 100, "fp8": 90}
QWEN3_MOE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, head_dim=32,
                 moe_intermediate_size=128, decoder_sparse_step=1, num_experts=4, num_experts_per_tok=2)


def _qconvert(*args: str | Path) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            qconvert_main([str(a) for a in args])
        except SystemExit as exit_:
            assert not exit_.code, err.getvalue()


def _qwen3_moe(folder: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("qwen3_moe", **QWEN3_MOE)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, Path]]:
    root = tmp_path_factory.mktemp("vllm-released")
    sources = {"llama": build_vllm_source("llama", root / "llama"), "qwen3_moe": _qwen3_moe(root / "qwen3-moe")}
    built = {}
    for family, source in sources.items():
        for kind, build in RELEASES.items():
            release = build(source, root / f"{family}-modelopt-{kind}")
            ours, plain = root / f"{family}-{kind}-ct", root / f"{family}-{kind}-plain"
            _qconvert("quantize", release, "-s", OUR_SCHEME[kind], "-o", ours, "-q")
            _qconvert("convert", release, "--op", "dequantize", "-o", plain, "-q")
            built[family, kind] = {"release": release, "ours": ours, "plain": plain}
    return built


@pytest.fixture(scope="module", autouse=True)
def report() -> object:
    yield
    harness.write_report(RESULTS, "vllm-released", "released checkpoints (ModelOpt) and qconvert's outputs of them")


CASES = [(family, kind) for family in ("llama", "qwen3_moe") for kind in RELEASES]


@pytest.mark.parametrize(("family", "kind"), CASES)
@pytest.mark.parametrize("which", ["release", "ours"])
def test_vllm_loads_every_tensor(built: dict, family: str, kind: str, which: str) -> None:
    folder = built[family, kind][which]
    label = f"modelopt-{kind}" if which == "release" else OUR_SCHEME[kind]
    result = harness.run_case(folder, family, label, CAPABILITY[kind], harness.model_config(folder, None))
    if which == "ours":  # (the table lists what qconvert writes; a release load only proves the fixture)
        RESULTS.append(result)
    assert result.loaded, result.problems
    methods = set(result.picks.values()) - {"UnquantizedLinearMethod"}
    prefix = "ModelOpt" if which == "release" else "CompressedTensors"
    assert methods and all(m.startswith(prefix) for m in methods), result.picks


# vLLM's fused parameters and the checkpoint layers stacked into them, in order.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _shard_rows(module: str, plain: dict[str, torch.Tensor]) -> list[int]:
    """The rows of each checkpoint layer stacked into vLLM's fused parameter ``module`` (one for unfused ones)."""
    parent, _, leaf = module.rpartition(".")
    parts = FUSED.get(leaf)
    if parts is None:
        return [plain[f"{module}.weight"].shape[0]]
    return [plain[f"{parent}.{part}.weight"].shape[0] for part in parts]


def _vllm_dequantized(params: dict[str, torch.Tensor], kind: str, rows_of: dict[str, list[int]]
                      ) -> dict[str, torch.Tensor]:
    """Each dense quantized parameter vLLM's ModelOpt loader filled, dequantized by vLLM's own arithmetic, shard by
    shard (each with its own per-tensor scale)."""
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import dequantize_to_dtype

    out = {}
    for name, weight in params.items():
        if name.endswith(("w13_weight", "w2_weight")) and f"{name}_scale" in params:
            out[name] = _vllm_experts_dequantized(params, name, kind)
            continue
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or f"{module}.weight_scale" not in params or "experts" in module:
            continue
        scale, pieces, first = params[f"{module}.weight_scale"], [], 0
        for shard, rows in enumerate(rows_of[module]):
            part = weight[first:first + rows]
            if kind == "nvfp4":
                scale_2 = params[f"{module}.weight_scale_2"].reshape(-1)[shard:shard + 1].float()
                pieces.append(dequantize_to_dtype(part, scale[first:first + rows], scale_2, torch.bfloat16,
                                                  swizzle=False))
            else:
                pieces.append((part.float() * scale.reshape(-1)[shard].float()).to(torch.bfloat16))
            first += rows
        out[module] = torch.cat(pieces)
    return out


def _vllm_experts_dequantized(params: dict[str, torch.Tensor], name: str, kind: str) -> torch.Tensor:
    """vLLM's fused experts parameter ``[E, rows, ...]`` (w13: gate rows then up rows, each with its own per-tensor
    scale; w2: one) dequantized expert by expert and shard by shard with vLLM's own arithmetic."""
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import dequantize_to_dtype

    weight, scale = params[name], params[f"{name}_scale"]
    shards = 2 if name.endswith("w13_weight") else 1
    rows = weight.shape[1] // shards
    experts = []
    for expert in range(weight.shape[0]):
        pieces = []
        for shard in range(shards):
            part = slice(shard * rows, (shard + 1) * rows)
            if kind == "nvfp4":
                scale_2 = params[f"{name}_scale_2"][expert].reshape(-1)[shard:shard + 1].float()
                pieces.append(dequantize_to_dtype(weight[expert, part], scale[expert, part], scale_2,
                                                  torch.bfloat16, swizzle=False))
            else:
                pieces.append((weight[expert, part].float() * scale[expert].reshape(-1)[shard].float()
                               ).to(torch.bfloat16))
        experts.append(torch.cat(pieces))
    return torch.stack(experts)


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_our_reader_is_vllms(built: dict, family: str, kind: str) -> None:
    """qconvert's dequantization of the release (``convert --op dequantize``), loaded by vLLM as a bf16 model,
    equals vLLM's own dequantization of the release as its ModelOpt loader loaded it, for every fused layer."""
    unfused = read_tensors(built[family, kind]["plain"])
    release = harness.loaded_parameters(built[family, kind]["release"], CAPABILITY[kind])
    rows_of = {name.removesuffix(".weight"): _shard_rows(name.removesuffix(".weight"), unfused)
               for name in release if name.endswith(".weight") and "experts" not in name
               and f"{name}_scale" in release}
    theirs = _vllm_dequantized(release, kind, rows_of)
    plain = harness.loaded_parameters(built[family, kind]["plain"], CAPABILITY[kind])
    assert len(theirs) == 4 * 2 if family == "llama" else 4 + 2 * 2, sorted(theirs)  # experts: w13 and w2
    for module, weight in theirs.items():
        name = module if module.endswith("_weight") else f"{module}.weight"
        assert torch.equal(plain[name], weight), module


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_nvfp4_relayout_is_the_same_bytes_in_vllm(built: dict, family: str) -> None:
    """What vLLM loads from the release and from qconvert's compressed-tensors NVFP4: the same codes and block
    scales (experts included), and global scales that are each other's float32 inverse."""
    release = harness.loaded_parameters(built[family, "nvfp4"]["release"], 100)
    ours = harness.loaded_parameters(built[family, "nvfp4"]["ours"], 100)
    compared = 0
    for name, codes in release.items():
        if not name.endswith("weight") or codes.dtype != torch.uint8:
            continue
        base = name.removesuffix("weight")
        assert torch.equal(ours[f"{base}weight_packed"], codes), name
        assert torch.equal(ours[f"{base}weight_scale"].view(torch.uint8),
                           release[f"{base}weight_scale"].view(torch.uint8)), name
        assert torch.equal(ours[f"{base}weight_global_scale"].float(),
                           1.0 / release[f"{base}weight_scale_2"].float()), name
        compared += 1
    assert compared >= 4, compared
    config = json.loads((built[family, "nvfp4"]["ours"] / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert read_tensors(built[family, "nvfp4"]["ours"])


@pytest.mark.parametrize("scheme", ["nvfp4", "fp8-block"])
def test_vllm_loads_the_exact_casts_of_mxfp4(tmp_path_factory: pytest.TempPathFactory, scheme: str) -> None:
    """MXFP4 cast exactly to NVFP4 (power-of-two global scales, zero block scales where MX stored all-zero blocks)
    and to fp8 blocks (power-of-two tile scales): every tensor loaded by vLLM's compressed-tensors methods."""
    root = tmp_path_factory.mktemp("vllm-casts")
    source = build_vllm_source("llama", root / "llama")
    _qconvert("quantize", source, "-s", "mxfp4", "-o", root / "mxfp4", "-q")
    _qconvert("quantize", root / "mxfp4", "-s", scheme, "-o", root / scheme, "-q")
    capability = 100 if scheme == "nvfp4" else 90
    result = harness.run_case(root / scheme, "llama", scheme, capability, harness.model_config(root / scheme, None))
    RESULTS.append(result)
    assert result.loaded, result.problems
    assert all(m.startswith("CompressedTensors") for m in set(result.picks.values()) - {"UnquantizedLinearMethod"})
