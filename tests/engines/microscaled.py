"""The checkpoint side of the engines' post-load checks for microscaled layers (NVFP4, MXFP4, MXFP8): each stored
layer decoded from the formats' definitions, with nothing of qconvert's or an engine's code.

- NVFP4 (compressed-tensors ``nvfp4-pack-quantized``): ``weight_packed`` uint8 [out, in/2], two E2M1 codes per
  byte, the even element in the low nibble (compressed-tensors' ``pack_fp4_to_uint8``); ``weight_scale``
  float8_e4m3fn [out, in/16]; ``weight_global_scale`` float32 [1], stored as a divisor:
  value = code x scale / global_scale.
- MXFP4 (``mxfp4-pack-quantized``): the same codes; ``weight_scale`` uint8 E8M0 [out, in/32]:
  value = code x 2^(scale - 127).
- MXFP8 (``mxfp8-quantized``): ``weight`` float8_e4m3fn [out, in]; ``weight_scale`` uint8 E8M0 [out, in/32].
"""

from __future__ import annotations

import torch

# E2M1 code (bit 3: sign, bits 0-2: magnitude) -> value.
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Weight-tensor leaf (an engine's parameter and the checkpoint's) per format.
VALUES = {"nvfp4": "weight_packed", "mxfp4": "weight_packed", "mxfp8": "weight"}
# Relative tolerance (of the largest weight) for "the same weights": float32 rounding of code x scale x factor
# in another order; a global scale of another shard is off by its ratio (percent).
TOLERANCE = 1e-6


def fp4_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n/2] -> float32 [..., n]."""
    table = torch.tensor(E2M1)
    return torch.stack((table[(packed & 0x0F).long()], table[(packed >> 4).long()]), -1).flatten(-2)


def decode(fmt: str, tensors: dict[str, torch.Tensor], values: str) -> torch.Tensor:
    """One stored layer's weight in float32; ``values``: the name of its ``weight_packed`` / ``weight`` tensor
    (``...q_proj.weight_packed``, or gpt-oss-style ``...experts.0.w13_weight_packed``)."""
    stem = values[: values.rindex("weight")]
    codes, scale = tensors[values], tensors[f"{stem}weight_scale"].float()
    weight = codes.float() if fmt == "mxfp8" else fp4_codes(codes)
    rows, cols = weight.shape
    if fmt == "nvfp4":
        factor = scale / tensors[f"{stem}weight_global_scale"].float().reshape(())
    else:
        factor = torch.exp2(scale - 127)
    return (weight.reshape(rows, scale.shape[-1], -1) * factor.unsqueeze(-1)).reshape(rows, cols)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference over the largest weight (inf for another shape)."""
    if got.shape != want.shape:
        return float("inf")
    return float((got.float() - want).abs().max()) / (float(want.abs().max()) or 1.0)


def part_label(names: list[str]) -> str:
    """``[...q_a_proj.weight_packed, ...kv_a_proj_with_mqa.weight_packed]`` -> ``q_a_proj+kv_a_proj_with_mqa``."""
    return "+".join(name.rsplit(".", 2)[-2] for name in names)
