"""``qconvert convert --op fnuz | shared-scale | pack | dequantize`` on real checkpoints."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from qconvert.quantizers import e4m3fn_to_e4m3fnuz, unpack_int32
from tests.conftest import read_config, read_tensors, run_cli, tree_digest
from tests.test_schemes import ct_decompress, our_dequantize


def _with_static_scales(folder: Path, kind: str, zero: str) -> dict[str, torch.Tensor]:
    """Give every quantized layer static input/output scales (one input scale left at zero, i.e.
    uncalibrated) and declare them in the config, as a calibrated wNa8o8 / static-FP8 model has."""
    tensors = read_tensors(folder)
    modules = [n.removesuffix(".weight_scale") for n in tensors if n.endswith(".weight_scale")]
    gen = torch.Generator().manual_seed(0)
    for module in modules:
        tensors[f"{module}.input_scale"] = torch.rand(1, generator=gen) * 0.05 + 0.01
        tensors[f"{module}.output_scale"] = torch.rand(1, generator=gen) * 0.05 + 0.01
    tensors[f"{zero}.input_scale"] = torch.zeros(1)
    for shard in folder.glob("*.safetensors"):
        shard.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = read_config(folder)
    static = {"num_bits": 8, "type": kind, "symmetric": True, "strategy": "tensor", "dynamic": False}
    for group in config["quantization_config"]["config_groups"].values():
        group["input_activations"] = static
        group["output_activations"] = static
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


def _dtype_codes(path: Path) -> set[str]:
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    return {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


def test_fnuz_keeps_every_code_value() -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    for scale in (torch.tensor(0.0371, dtype=torch.bfloat16), torch.tensor(1.3e-3), torch.tensor(2.0)):
        before = codes.to(scale.dtype) * scale
        after = e4m3fn_to_e4m3fnuz(codes).to(scale.dtype) * (scale * 2)
        same = (before == after) | (before.isnan() & after.isnan())
        assert same.all(), scale  # -0 (0x80) becomes +0, which compares equal; NaN stays NaN
    assert codes.view(torch.uint8)[0x80] == 0x80  # the input was not modified


def test_fnuz_conversion_end_to_end(tiny_llama: Path, tmp_path: Path) -> None:
    fp8 = tmp_path / "fp8"
    assert run_cli("quantize", tiny_llama, "-s", "fp8", "-o", fp8, "-q").code == 0
    zero = "model.layers.0.mlp.up_proj"
    source = _with_static_scales(fp8, "float", zero)
    before = tree_digest(fp8)
    result = run_cli("convert", fp8, "--op", "fnuz", "-o", tmp_path / "fnuz", "--json")
    assert result.code == 0, result.stderr
    assert "uncalibrated" in result.stderr and tree_digest(fp8) == before
    assert len(json.loads(result.stdout)["converted"]) == 14
    out = read_tensors(tmp_path / "fnuz")
    assert "F8_E4M3FNUZ" in _dtype_codes(tmp_path / "fnuz" / "model.safetensors")
    assert f"{zero}.input_scale" not in out
    for module in (n.removesuffix(".weight_scale") for n in source if n.endswith(".weight_scale")):
        assert out[f"{module}.weight"].dtype == torch.float8_e4m3fnuz
        assert torch.equal(out[f"{module}.weight_scale"], source[f"{module}.weight_scale"] * 2)
        if module != zero:
            assert torch.equal(out[f"{module}.input_scale"], source[f"{module}.input_scale"] * 2)
        assert torch.equal(out[f"{module}.output_scale"], source[f"{module}.output_scale"])
        assert torch.equal(our_dequantize(out, module), our_dequantize(source, module)), module
    # --fnuz on quantize writes the same bits as quantize followed by convert --op fnuz.
    assert run_cli("quantize", tiny_llama, "-s", "fp8", "--fnuz", "-o", tmp_path / "direct", "-q").code == 0
    assert run_cli("quantize", tiny_llama, "-s", "fp8", "-o", tmp_path / "plain", "-q").code == 0
    assert run_cli("convert", tmp_path / "plain", "--op", "fnuz", "-o", tmp_path / "two-step", "-q").code == 0
    direct, two_step = read_tensors(tmp_path / "direct"), read_tensors(tmp_path / "two-step")
    assert direct.keys() == two_step.keys()
    for name in direct:
        a, b = direct[name], two_step[name]
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                                                  b.view(torch.uint8) if b.element_size() == 1 else b)


def test_shared_scale_requantizes_fused_parts_across_shards(tiny_llama: Path, tmp_path: Path) -> None:
    # Per-tensor FP8 with one scale per part (fusing disabled), parts spread over small shards.
    per_part = tmp_path / "per-part"
    result = run_cli("quantize", tiny_llama, "-s", "fp8-tensor", "--fuse", "^(no-such-module)$", "-o", per_part,
                     "--max-shard-size", "100KB", "-q")
    assert result.code == 0, result.stderr
    source = read_tensors(per_part)
    attn = "model.layers.0.self_attn"
    assert len({source[f"{attn}.{p}_proj.weight_scale"].item() for p in "qkv"}) > 1  # not shared yet
    index = json.loads((per_part / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({index[f"{attn}.{p}_proj.weight"] for p in "qkv"}) > 1

    out = tmp_path / "shared"
    result = run_cli("convert", per_part, "--op", "shared-scale", "-o", out, "--json")
    assert result.code == 0, result.stderr
    assert len(json.loads(result.stdout)["converted"]) == 10  # 2 x (q, k, v, gate, up)
    written = read_tensors(out)
    for layer in (0, 1):
        for parts in (["q", "k", "v"], ["gate", "up"]):
            prefix = f"model.layers.{layer}.{'self_attn' if 'q' in parts else 'mlp'}"
            names = [f"{prefix}.{p}_proj" for p in parts]
            shared = torch.stack([source[f"{n}.weight_scale"] for n in names]).max()
            for name in names:
                assert torch.equal(written[f"{name}.weight_scale"], shared.reshape(1))
                exact = source[f"{name}.weight"].float() * source[f"{name}.weight_scale"].float()
                expected = (exact / shared.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
                assert torch.equal(written[f"{name}.weight"].view(torch.uint8), expected.view(torch.uint8))
        for name in (f"model.layers.{layer}.self_attn.o_proj", f"model.layers.{layer}.mlp.down_proj"):
            assert torch.equal(written[f"{name}.weight"].view(torch.uint8), source[f"{name}.weight"].view(torch.uint8))
            assert torch.equal(written[f"{name}.weight_scale"], source[f"{name}.weight_scale"])
    rebuilt = ct_decompress(out)
    assert torch.equal(rebuilt[f"{attn}.q_proj"], our_dequantize(written, f"{attn}.q_proj"))


def test_pack_int_quantized_keeps_values_and_static_scales(tiny_llama: Path, tmp_path: Path) -> None:
    w8a8 = tmp_path / "w8a8"
    assert run_cli("quantize", tiny_llama, "-s", "w8a8-int8", "-o", w8a8, "-q").code == 0
    zero = "model.layers.1.self_attn.k_proj"
    source = _with_static_scales(w8a8, "int", zero)
    result = run_cli("convert", w8a8, "--op", "pack", "-o", tmp_path / "packed")
    assert result.code == 0, result.stderr
    assert "uncalibrated" in result.stderr
    out = read_tensors(tmp_path / "packed")
    config = read_config(tmp_path / "packed")["quantization_config"]
    assert config["format"] == "pack-quantized"
    group = next(iter(config["config_groups"].values()))
    assert group["format"] == "pack-quantized" and group["input_activations"]["dynamic"] is False
    modules = [n.removesuffix(".weight_packed") for n in out if n.endswith(".weight_packed")]
    assert len(modules) == 14
    for module in modules:
        assert torch.equal(unpack_int32(out[f"{module}.weight_packed"], 8, out[f"{module}.weight_shape"][1].item()),
                           source[f"{module}.weight"])
        assert torch.equal(out[f"{module}.weight_scale"], source[f"{module}.weight_scale"])
        assert torch.equal(out[f"{module}.output_scale"], source[f"{module}.output_scale"])
        assert (f"{module}.input_scale" in out) == (module != zero)
    rebuilt = ct_decompress(tmp_path / "packed")
    for module in modules:
        assert torch.equal(rebuilt[module], our_dequantize(source, module))


def test_pack_int4_held_in_int8(tmp_path: Path) -> None:
    model = tmp_path / "int4"
    model.mkdir()
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(-8, 8, (64, 256), dtype=torch.int8, generator=gen)
    scale = (torch.rand(64, 2, generator=gen) * 0.01).to(torch.bfloat16)
    save_file({"model.layers.0.mlp.up_proj.weight": codes, "model.layers.0.mlp.up_proj.weight_scale": scale},
              model / "model.safetensors")
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}
    config = {"architectures": ["LlamaForCausalLM"], "quantization_config": {
        "quant_method": "compressed-tensors", "format": "int-quantized", "ignore": [],
        "config_groups": {"group_0": {"targets": ["Linear"], "format": "int-quantized", "weights": weights}}}}
    (model / "config.json").write_text(json.dumps(config))
    assert run_cli("convert", model, "--op", "pack", "-o", tmp_path / "packed", "-q").code == 0
    out = read_tensors(tmp_path / "packed")
    packed = out["model.layers.0.mlp.up_proj.weight_packed"]
    assert packed.shape == (64, 32) and torch.equal(unpack_int32(packed, 4, 256), codes)
    # Values outside the declared bit width are refused, not silently wrapped.
    codes[0, 0] = 9
    save_file({"model.layers.0.mlp.up_proj.weight": codes, "model.layers.0.mlp.up_proj.weight_scale": scale},
              model / "model.safetensors")
    bad = run_cli("convert", model, "--op", "pack", "-o", tmp_path / "bad")
    assert bad.code == 2 and "outside the 4-bit range" in bad.stderr and not (tmp_path / "bad").exists()


def test_dequantize_deepseek_to_plain_bf16(deepseek_fp8: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    result = run_cli("convert", deepseek_fp8, "--op", "dequantize", "-o", tmp_path / "dq")
    assert result.code == 0, result.stderr
    assert "quantization_config" not in read_config(tmp_path / "dq")
    source, out = read_tensors(deepseek_fp8), read_tensors(tmp_path / "dq")
    assert not any(name.endswith("weight_scale_inv") for name in out)
    name = "model.layers.1.mlp.down_proj"
    values, scales = source[f"{name}.weight"].float(), source[f"{name}.weight_scale_inv"]
    expanded = scales.repeat_interleave(128, 0).repeat_interleave(128, 1)[: values.shape[0], : values.shape[1]]
    expected = (values * expanded).to(torch.bfloat16)
    assert out[f"{name}.weight"].dtype == torch.bfloat16 and torch.equal(out[f"{name}.weight"], expected)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dq")
    assert torch.equal(model.get_submodule(name).weight.detach(), out[f"{name}.weight"])
    fp32 = run_cli("convert", deepseek_fp8, "--op", "dequantize", "--dtype", "fp32", "-o", tmp_path / "dq32", "-q")
    assert fp32.code == 0 and read_tensors(tmp_path / "dq32")[f"{name}.weight"].dtype == torch.float32


def test_convert_bad_input(tiny_llama: Path, tmp_path: Path) -> None:
    plain = run_cli("convert", tiny_llama, "--op", "fnuz", "-o", tmp_path / "x")
    assert plain.code == 2 and "no quantized layers" in plain.stderr and len(plain.stderr_lines) == 1
    assert run_cli("quantize", tiny_llama, "-s", "rtn4", "-o", tmp_path / "q", "-q").code == 0
    unknown = run_cli("convert", tmp_path / "q", "--op", "fp4", "-o", tmp_path / "y")
    assert unknown.code == 2 and "fnuz" in unknown.stderr
    wrong = run_cli("convert", tmp_path / "q", "--op", "fnuz", "-o", tmp_path / "z")
    assert wrong.code == 2 and "pack-quantized" in wrong.stderr
    assert not any((tmp_path / d).exists() for d in "xyz")
