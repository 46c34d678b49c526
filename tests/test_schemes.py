"""Every scheme: bit-exact against the compressed-tensors library's own dequantization and against
FORMAT.md's formulas; the SGLang layout; shared fused scales; mixed schemes; dry runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.utils.match import is_match
from safetensors import safe_open
from safetensors.torch import save_file

from qconvert.quantizers import dequantize_tiles, unpack_int32
from qconvert.serving import Engine, output_kind, serving_for
from tests.conftest import read_config, read_tensors, run_cli
from tests.test_quantize_cli import _load_with_compressed_tensors

SCHEMES = ["int8-block", "w8a8-int8", "fp8", "fp8-block", "fp8-tensor"]
TILES = {"int8-block": (128, 128), "fp8-block": (128, 128)}


def ct_decompress(folder: Path) -> dict[str, torch.Tensor]:
    """Every quantized module's weight as compressed-tensors rebuilds it: its own target matching
    picks the config group, its own compressor for that group's format decompresses."""
    config = QuantizationConfig.model_validate(read_config(folder)["quantization_config"])
    tensors = read_tensors(folder)
    modules = {name.rsplit(".", 1)[0] for name in tensors if name.endswith((".weight_scale", ".weight_packed"))}
    linear = torch.nn.Linear(1, 1, device="meta")
    rebuilt = {}
    for module in sorted(modules):
        matching = [g for g in config.config_groups.values() if is_match(module, linear, g.targets, config.ignore)]
        # compressed-tensors' precedence: a group naming the module wins over a class-name ("Linear") group.
        named = [g for g in matching if any(t != "Linear" for t in g.targets if is_match(module, linear, [t]))]
        (scheme,) = named or matching
        state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == module}
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        rebuilt[module] = compressor.decompress(state, scheme)["weight"]
    return rebuilt


def our_dequantize(tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    if f"{module}.weight_packed" in tensors:
        packed, scale = tensors[f"{module}.weight_packed"], tensors[f"{module}.weight_scale"]
        _, in_features = tensors[f"{module}.weight_shape"].tolist()
        bits = 32 * packed.shape[1] // in_features if in_features % 8 == 0 else 4
        return dequantize_tiles(unpack_int32(packed, bits, in_features), scale, (1, in_features // scale.shape[1]))
    values, scale = tensors[f"{module}.weight"], tensors[f"{module}.weight_scale"]
    rows, cols = values.shape
    if scale.numel() == 1:
        tile = (rows, cols)
    elif scale.shape[1] == 1 and scale.shape[0] == rows:
        tile = (1, cols)
    else:
        tile = (-(-rows // scale.shape[0]), -(-cols // scale.shape[1]))
        tile = (128, 128) if tile[0] > 1 else tile
    return dequantize_tiles(values, scale.reshape(-(-rows // tile[0]), -(-cols // tile[1])), tile)


def reference_fp8(weight: torch.Tensor, tile: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """FORMAT.md, written out plainly: amax/448 in float32 cast to the weight dtype; x/scale in the
    weight dtype; clamp; cast to e4m3fn. Blocks are padded for the scale, values kept at true size."""
    rows, cols = weight.shape
    th, tw = tile
    padded = torch.zeros(-(-rows // th) * th, -(-cols // tw) * tw, dtype=weight.dtype)
    padded[:rows, :cols] = weight
    blocks = padded.reshape(padded.shape[0] // th, th, padded.shape[1] // tw, tw)
    scale = (blocks.float().abs().amax(dim=(1, 3)) / 448.0).to(weight.dtype)
    scale = torch.where(scale == 0, torch.finfo(weight.dtype).eps, scale)  # all-zero tile: no NaN
    expanded = scale.repeat_interleave(th, 0).repeat_interleave(tw, 1)[:rows, :cols]
    values = (weight / expanded).clamp(-448, 448).to(torch.float8_e4m3fn)
    return values, scale


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_matches_compressed_tensors_and_transformers(tiny_llama: Path, tmp_path: Path, scheme: str) -> None:
    out = tmp_path / scheme
    result = run_cli("quantize", tiny_llama, "-s", scheme, "-o", out, "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["quantized_layers"] == 14
    qconfig = read_config(out)["quantization_config"]
    group = next(iter(qconfig["config_groups"].values()))
    assert qconfig["format"] == group["format"] == ("float-quantized" if "fp8" in scheme else "int-quantized")
    assert group["input_activations"]["dynamic"] is True

    # This test is the transformers row of the serving table: it loads every scheme the table says it does.
    assert any(s.engine == Engine.TRANSFORMERS for s in serving_for(output_kind(scheme)))
    tensors = read_tensors(out)
    theirs = ct_decompress(out)
    model = _load_with_compressed_tensors(out)
    for layer in summary["layers"]:
        module = layer["module"]
        ours = our_dequantize(tensors, module)
        assert torch.equal(theirs[module], ours), module
        assert torch.equal(model.get_submodule(module).weight.detach(), ours), module


@pytest.mark.parametrize(("scheme", "tile"), [("fp8", None), ("fp8-block", (128, 128))])
def test_fp8_outputs_equal_the_reference_formulas(tmp_path: Path, scheme: str, tile) -> None:
    # Shapes that are not multiples of the block: padded for the scale, written at true size.
    torch.manual_seed(3)
    weights = {
        "model.layers.0.mlp.up_proj.weight": (torch.randn(300, 200) * 0.03).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": (torch.randn(200, 300) * 0.03).to(torch.bfloat16),
    }
    weights["model.layers.0.mlp.up_proj.weight"][:128, :128] = 0  # an all-zero block: no NaN
    model = tmp_path / "m"
    model.mkdir()
    save_file(weights, model / "model.safetensors")
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert run_cli("quantize", model, "-s", scheme, "-o", tmp_path / "out", "-q").code == 0
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        for name, weight in weights.items():
            prefix = name.removesuffix(".weight")
            values, scale = reference_fp8(weight, tile or (1, weight.shape[1]))
            stored = f.get_tensor(name)
            assert stored.dtype == torch.float8_e4m3fn and stored.shape == weight.shape
            assert torch.equal(stored.view(torch.uint8), values.view(torch.uint8))
            assert torch.equal(f.get_tensor(f"{prefix}.weight_scale"), scale)
            assert not torch.isnan(stored.float()).any()
    expected_scale_shape = (3, 2) if tile else (300, 1)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert tuple(f.get_tensor("model.layers.0.mlp.up_proj.weight_scale").shape) == expected_scale_shape


def test_sglang_layout_holds_the_same_values(tiny_llama: Path, tmp_path: Path) -> None:
    assert run_cli("quantize", tiny_llama, "-s", "int8-block", "-o", tmp_path / "ct", "-q").code == 0
    result = run_cli("quantize", tiny_llama, "-s", "int8-block", "--layout", "sglang", "--force-layout",
                     "-o", tmp_path / "sgl", "-q")
    assert result.code == 0, result.stderr
    config = read_config(tmp_path / "sgl")["quantization_config"]
    assert config == {"quant_method": "blockwise_int8", "activation_scheme": "dynamic",
                      "weight_block_size": [128, 128], "ignored_layers": ["lm_head"]}
    ct, sgl = read_tensors(tmp_path / "ct"), read_tensors(tmp_path / "sgl")
    modules = [n.removesuffix(".weight_scale") for n in ct if n.endswith(".weight_scale")]
    assert len(modules) == 14
    for module in modules:
        assert torch.equal(ct[f"{module}.weight"], sgl[f"{module}.weight"])
        inv = sgl[f"{module}.weight_scale_inv"]
        assert inv.dtype == torch.float32 and torch.equal(inv, ct[f"{module}.weight_scale"].float())
    bad = run_cli("quantize", tiny_llama, "-s", "fp8", "--layout", "sglang", "-o", tmp_path / "x")
    assert bad.code == 2 and "int8-block" in bad.stderr


def test_fp8_tensor_shares_scales_across_fused_modules(tiny_llama: Path, tmp_path: Path) -> None:
    result = run_cli("quantize", tiny_llama, "-s", "fp8-tensor", "-o", tmp_path / "out", "--max-shard-size", "150KB")
    assert result.code == 0, result.stderr
    tensors = read_tensors(tmp_path / "out")
    original = read_tensors(tiny_llama)
    for layer in (0, 1):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        qkv = [tensors[f"{attn}.{p}_proj.weight_scale"] for p in "qkv"]
        assert qkv[0].shape == (1,) and all(torch.equal(s, qkv[0]) for s in qkv)
        gate, up = tensors[f"{mlp}.gate_proj.weight_scale"], tensors[f"{mlp}.up_proj.weight_scale"]
        assert torch.equal(gate, up)
        # The shared scale is the per-tensor scale of the fused matrix: max amax / 448.
        fused = torch.cat([original[f"{attn}.{p}_proj.weight"] for p in "qkv"])
        assert torch.equal(qkv[0], (fused.float().abs().amax() / 448).to(torch.bfloat16).reshape(1))
        down, o = tensors[f"{mlp}.down_proj.weight_scale"], tensors[f"{attn}.o_proj.weight_scale"]
        assert not torch.equal(down, gate) and not torch.equal(o, qkv[0])
    # The shards split the fused parts (150KB shards), yet the scales are shared.
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({index[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkvo"}) > 1


def test_mixed_schemes_and_overrides_file(tiny_llama: Path, tmp_path: Path) -> None:
    overrides = tmp_path / "overrides.txt"
    overrides.write_text("# attention in fp8, first MLP down in int4\nre:.*self_attn.*=fp8\n"
                         "model.layers.0.mlp.down_proj=rtn4\n")
    result = run_cli("quantize", tiny_llama, "-s", "rtn8", "-o", tmp_path / "out", "--overrides", overrides,
                     "--override", r"re:model\.layers\.1\.mlp\.(gate|up)_proj=none", "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    by_module = {layer["module"]: layer["scheme"] for layer in summary["layers"]}
    assert by_module["model.layers.0.self_attn.q_proj"] == "fp8"
    assert by_module["model.layers.0.mlp.down_proj"] == "rtn4"
    assert by_module["model.layers.1.mlp.down_proj"] == "rtn8"
    assert "model.layers.1.mlp.up_proj" not in by_module and "model.layers.1.mlp.gate_proj" not in by_module
    qconfig = read_config(tmp_path / "out")["quantization_config"]
    assert qconfig["format"] == "mixed-precision"
    groups = {g["format"] + str(g["weights"]["num_bits"]): g for g in qconfig["config_groups"].values()}
    assert set(groups) == {"float-quantized8", "pack-quantized4", "pack-quantized8"}
    assert groups["pack-quantized4"]["targets"] == ["model.layers.0.mlp.down_proj"]
    # The largest group (attention, fp8) catches every other Linear; the others name their layers, with the
    # fused names engines build (gate/up → gate_up_proj) beside the separate ones.
    assert groups["float-quantized8"]["targets"] == ["Linear"]
    assert {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.gate_up_proj"} <= set(
        groups["pack-quantized8"]["targets"])
    assert {"model.layers.1.mlp.up_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.gate_up_proj"} <= set(
        qconfig["ignore"])
    tensors = read_tensors(tmp_path / "out")
    theirs = ct_decompress(tmp_path / "out")
    assert set(theirs) == set(by_module)
    for module in by_module:
        assert torch.equal(theirs[module], our_dequantize(tensors, module)), module


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("quantize", tiny_llama, "-s", "fp8-block", "-o", out, "--dry-run", "--json",
                     "--override", "re:.*down_proj=rtn4")
    assert result.code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["dry_run"] is True and not out.exists() and list(tmp_path.iterdir()) == []
    assert {layer["scheme"] for layer in plan["layers"]} == {"fp8-block", "rtn4"}
    assert plan["bytes_after"] < plan["bytes_before"] and plan["bits_per_weight"] > 4
    # The plan's byte counts are what a real run writes.
    real = json.loads(run_cli("quantize", tiny_llama, "-s", "fp8-block", "-o", out, "--json",
                              "--override", "re:.*down_proj=rtn4").stdout)
    assert real["bytes_after"] == plan["bytes_after"] and real["layers"] == plan["layers"]
    table = run_cli("quantize", tiny_llama, "-s", "fp8-block", "-o", tmp_path / "other", "--dry-run")
    assert table.code == 0 and "dry run" in table.stdout and "bits per quantized weight" in table.stdout
    assert not (tmp_path / "other").exists()
