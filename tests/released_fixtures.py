"""Checkpoints in the layouts quantized releases ship, built from a bf16 checkpoint: gpt-oss's MXFP4 experts and
NVIDIA ModelOpt's NVFP4 and FP8. Shared by tests/test_released.py and the engine tier (which reads them with vLLM's
own ModelOpt loaders), so this module needs only torch, safetensors and qconvert's pure primitives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from qconvert.formats import NumberType
from qconvert.microscaling import quantize_mx, quantize_nvfp4
from tests.conftest import read_tensors  # (stdlib, pytest and torch only: importable in the engine venvs)

EXPERT_TENSORS = ("gate_up_proj", "down_proj")


def excluded(tensors: dict[str, torch.Tensor]) -> list[str]:
    """What ModelOpt releases leave unquantized, named as they ship it: the output head and each MoE router."""
    return ["lm_head", *sorted(name.removesuffix(".weight") for name in tensors if name.endswith(".mlp.gate.weight"))]


def to_mxfp4_release(bf16: Path, folder: Path) -> Path:
    """``bf16`` (a gpt-oss checkpoint) with every expert tensor stored as gpt-oss's MXFP4 release stores it."""
    folder.mkdir(parents=True)
    tensors = read_tensors(bf16)
    out = {}
    for name, tensor in tensors.items():
        if name.rpartition(".")[2] not in EXPERT_TENSORS:
            out[name] = tensor
            continue
        rows = tensor.transpose(1, 2)  # [E, out, in], as the release stores rows
        experts, out_features, in_features = rows.shape
        packed, exponents = zip(*(quantize_mx(rows[e].contiguous(), NumberType.FP4_E2M1) for e in range(experts)),
                                strict=True)
        out[f"{name}_blocks"] = torch.stack(packed).reshape(experts, out_features, in_features // 32, 16)
        out[f"{name}_scales"] = torch.stack(exponents)
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((bf16 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4",
                                     "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))
    for extra in bf16.iterdir():
        if extra.suffix != ".safetensors" and extra.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(extra, folder / extra.name)
    return folder


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def to_modelopt_nvfp4(bf16: Path, folder: Path) -> Path:
    """A Llama stored as NVIDIA ModelOpt's NVFP4 releases store it: ``weight`` uint8 codes, ``weight_scale`` e4m3
    per 16, ``weight_scale_2`` float32 (amax / 2688, shared by q/k/v and by gate/up), ``input_scale`` float32."""
    folder.mkdir(parents=True)
    tensors = read_tensors(bf16)
    out = dict(tensors)
    modules = sorted(name.removesuffix(".weight") for name in tensors
                     if name.endswith(".weight") and name.rsplit(".", 2)[-2] in LINEARS)
    for module in modules:
        leaf = module.rpartition(".")[2]
        group = next((g for g in FUSED if leaf in g), (leaf,))
        siblings = [f"{module.rpartition('.')[0]}.{other}.weight" for other in group]
        amax = torch.stack([tensors[s].float().abs().amax() for s in siblings]).max()
        scale_2 = (amax / 2688).reshape(())
        packed, scales = quantize_nvfp4(tensors[f"{module}.weight"], 1.0 / scale_2)
        out[f"{module}.weight"] = packed
        out[f"{module}.weight_scale"] = scales
        out[f"{module}.weight_scale_2"] = scale_2
        out[f"{module}.input_scale"] = torch.tensor(0.02)
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((bf16 / "config.json").read_text())
    quant = {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": excluded(tensors)}
    config["quantization_config"] = {"quant_method": "modelopt", **quant}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"},
                                                             "quantization": quant}))
    return folder


def to_modelopt_fp8(bf16: Path, folder: Path) -> Path:
    """A Llama as ModelOpt's FP8 releases store it: ``weight`` e4m3fn, ``weight_scale`` float32 scalar (amax / 448,
    one per layer), ``input_scale`` float32 scalar."""
    folder.mkdir(parents=True)
    tensors = read_tensors(bf16)
    out = dict(tensors)
    for name, weight in tensors.items():
        if name.endswith(".weight") and name.rsplit(".", 2)[-2] in LINEARS:
            module = name.removesuffix(".weight")
            scale = (weight.float().abs().amax() / 448).reshape(())
            out[name] = (weight.float() / scale).to(torch.float8_e4m3fn)
            out[f"{module}.weight_scale"] = scale
            out[f"{module}.input_scale"] = torch.tensor(0.03)
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((bf16 / "config.json").read_text())
    quant = {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": excluded(tensors)}
    config["quantization_config"] = {"quant_method": "modelopt", **quant}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"},
                                                             "quantization": quant}))
    return folder


