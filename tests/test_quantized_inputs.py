"""Inputs that are already quantized: DeepSeek-style FP8 and compressed-tensors checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qconvert.quantizers import dequantize_tiles
from tests.conftest import read_config, read_tensors, run_cli, tree_digest
from tests.test_quantize_cli import _load_with_compressed_tensors
from tests.test_schemes import ct_decompress

LINEARS = [f"model.layers.{i}.{m}" for i in (0, 1) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx.float() - exact.float()).norm() / exact.float().norm()).item()


def test_deepseek_fp8_block_to_int8_block(deepseek_fp8: Path, tiny_llama: Path, tmp_path: Path) -> None:
    before = tree_digest(deepseek_fp8)
    out = tmp_path / "int8"
    result = run_cli("quantize", deepseek_fp8, "-s", "int8-block", "-o", out, "--json")
    assert result.code == 0, result.stderr
    assert "deepseek-fp8" in result.stderr
    assert tree_digest(deepseek_fp8) == before
    summary = json.loads(result.stdout)
    assert sorted(layer["module"] for layer in summary["layers"]) == sorted(LINEARS)
    (group,) = read_config(out)["quantization_config"]["config_groups"].values()
    assert group["weights"]["strategy"] == "block"

    source = read_tensors(tiny_llama)
    fp8 = read_tensors(deepseek_fp8)
    written = read_tensors(out)
    rebuilt = ct_decompress(out)
    for module in LINEARS:
        # What the FP8 checkpoint represents: its values times their block scales, in bf16.
        represented = dequantize_tiles(fp8[f"{module}.weight"], fp8[f"{module}.weight_scale_inv"], (128, 128),
                                       torch.bfloat16).float()
        codes, scale = written[f"{module}.weight"], written[f"{module}.weight_scale"].float()
        step = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: codes.shape[0], : codes.shape[1]]
        # Round to nearest after the reference's division in bf16: every element within half a step of
        # its block scale, plus half a bf16 ulp of its quotient (0.25 step once |x/scale| >= 64).
        quotient = (represented / step).abs().clamp_min(2**-20)
        bf16_half_ulp = torch.exp2(torch.floor(torch.log2(quotient)) - 8)
        assert ((codes.float() * step - represented).abs() <= step * (0.5 + bf16_half_ulp)).all(), module
        # Figures: FP8 itself is ~2.65% (relative norm) from the bf16 source on these Gaussian weights and
        # int8 128x128 blocks add ~1.0-1.1%, so the total stays under 3%. (The 1% against the
        # bf16 source cannot hold on this fixture for any converter: see the issue note.)
        assert _relative_error(rebuilt[module], source[f"{module}.weight"]) <= 0.03, module
    model = _load_with_compressed_tensors(out)
    for module in LINEARS:
        assert torch.equal(model.get_submodule(module).weight.detach(), rebuilt[module].to(torch.bfloat16))


def test_matching_layers_are_copied_not_requantized(deepseek_fp8: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp8-block"
    result = run_cli("quantize", deepseek_fp8, "-s", "fp8-block", "-o", out, "--ignore", "model.layers.1.mlp.down_proj")
    assert result.code == 0, result.stderr
    source, written = read_tensors(deepseek_fp8), read_tensors(out)
    for module in LINEARS:
        if module == "model.layers.1.mlp.down_proj":
            continue
        assert torch.equal(written[f"{module}.weight"].view(torch.uint8), source[f"{module}.weight"].view(torch.uint8))
        scale = written[f"{module}.weight_scale"]
        assert scale.dtype == torch.float32 and torch.equal(scale, source[f"{module}.weight_scale_inv"])
    # The ignored layer is written back in full precision: the FP8 values times their block scales.
    up = written["model.layers.1.mlp.down_proj.weight"]
    values = source["model.layers.1.mlp.down_proj.weight"].float()
    scales = source["model.layers.1.mlp.down_proj.weight_scale_inv"]
    expected = (values * scales.repeat_interleave(128, 0).repeat_interleave(128, 1)[: up.shape[0], : up.shape[1]])
    assert up.dtype == torch.bfloat16 and torch.equal(up, expected.to(torch.bfloat16))
    assert "model.layers.1.mlp.down_proj" in read_config(out)["quantization_config"]["ignore"]
    theirs = ct_decompress(out)
    model = _load_with_compressed_tensors(out)
    for module in theirs:
        assert torch.equal(model.get_submodule(module).weight.detach(), theirs[module].to(torch.bfloat16))


def test_deepseek_fp8_to_rtn4_and_fp8_tensor(deepseek_fp8: Path, tiny_llama: Path, tmp_path: Path) -> None:
    source = read_tensors(tiny_llama)
    for scheme, bound in (("rtn4", 0.15), ("fp8-tensor", 0.08)):
        out = tmp_path / scheme
        result = run_cli("quantize", deepseek_fp8, "-s", scheme, "-o", out, "-q")
        assert result.code == 0, result.stderr
        rebuilt = ct_decompress(out)
        for module in LINEARS:
            assert _relative_error(rebuilt[module], source[f"{module}.weight"]) < bound, (scheme, module)
    tensors = read_tensors(tmp_path / "fp8-tensor")
    scales = [tensors[f"model.layers.0.self_attn.{p}_proj.weight_scale"] for p in "qkv"]
    assert all(torch.equal(s, scales[0]) for s in scales)


def test_integer_inputs_need_allow_requantize(tiny_llama: Path, tmp_path: Path) -> None:
    int8 = tmp_path / "int8"
    assert run_cli("quantize", tiny_llama, "-s", "int8-block", "-o", int8, "-q").code == 0
    refused = run_cli("quantize", int8, "-s", "rtn4", "-o", tmp_path / "r")
    assert refused.code == 2 and "--allow-requantize" in refused.stderr and len(refused.stderr_lines) == 1
    assert not (tmp_path / "r").exists()
    allowed = run_cli("quantize", int8, "-s", "rtn4", "-o", tmp_path / "r", "--allow-requantize", "-q")
    assert allowed.code == 0, allowed.stderr
    # The same scheme again: nothing to requantize, every tensor copied bit for bit.
    same = run_cli("quantize", int8, "-s", "int8-block", "-o", tmp_path / "same", "-q")
    assert same.code == 0, same.stderr
    first, second = read_tensors(int8), read_tensors(tmp_path / "same")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_float_inputs_are_requantized(tiny_llama: Path, tmp_path: Path) -> None:
    fp8 = tmp_path / "fp8"
    assert run_cli("quantize", tiny_llama, "-s", "fp8", "-o", fp8, "-q").code == 0
    result = run_cli("quantize", fp8, "-s", "fp8-block", "-o", tmp_path / "block", "-q")
    assert result.code == 0, result.stderr
    source = read_tensors(tiny_llama)
    rebuilt = ct_decompress(tmp_path / "block")
    for module in LINEARS:
        assert _relative_error(rebuilt[module], source[f"{module}.weight"]) < 0.08


def test_inspect_names_each_input_format(tiny_llama: Path, deepseek_fp8: Path, tmp_path: Path) -> None:
    assert run_cli("quantize", tiny_llama, "-s", "int8-block", "--layout", "sglang", "--force-layout",
                   "-o", tmp_path / "sgl").code == 0
    assert run_cli("quantize", tiny_llama, "-s", "w8a8-int8", "-o", tmp_path / "w8a8").code == 0
    assert run_cli("quantize", tiny_llama, "-s", "fp8-block", "--fnuz", "-o", tmp_path / "fnuz").code == 0
    assert run_cli("quantize", tiny_llama, "-s", "rtn4", "--group-size", "64", "-o", tmp_path / "rtn4").code == 0
    expected = {
        tmp_path / "fnuz": ("compressed-tensors float-quantized (e4m3fnuz)", "fp8 e4m3fnuz block 128x128"),
        tmp_path / "rtn4": ("compressed-tensors pack-quantized", "int4 g64"),
        tiny_llama: ("bf16 (unquantized)", None),
        deepseek_fp8: ("DeepSeek-style FP8", "fp8 block 128x128"),
        tmp_path / "sgl": ("SGLang blockwise_int8", "int8 block 128x128"),
        tmp_path / "w8a8": ("compressed-tensors int-quantized", "int8 per-channel"),
    }
    for path, (fmt, scheme) in expected.items():
        result = run_cli("inspect", path, "--json")
        assert result.code == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["format"].startswith(fmt), report["format"]
        if scheme:
            schemes = {layer["scheme"] for layer in report["layers"] if layer["format"] != "unquantized"}
            assert schemes == {scheme}, schemes
