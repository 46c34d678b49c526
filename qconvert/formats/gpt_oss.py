"""gpt-oss's MXFP4 release (read only): each layer's experts as ``*_blocks`` / ``*_scales`` tensor pairs.

``mlp.experts.gate_up_proj_blocks`` is uint8 ``[experts, 2 x intermediate, hidden / 32, 16]``: per output row, the
hidden inputs in blocks of 32 E2M1 codes, two per byte (element ``2j`` in the low nibble), and
``mlp.experts.gate_up_proj_scales`` uint8 ``[experts, 2 x intermediate, hidden / 32]`` one E8M0 exponent per block
(127 = 2**0; 255 is the format's NaN). ``down_proj_*`` likewise with ``[experts, hidden, intermediate / 32, ...]``.
The config says ``quantization_config: {quant_method: mxfp4}``.

The bf16 release stores the same weights as ``mlp.experts.gate_up_proj`` ``[experts, hidden, 2 x intermediate]``
(inputs first, gate and up interleaved in the columns), which is what transformers' MXFP4 integration rebuilds:
each code's value times its block's power of two, transposed. A pair is read here as that logical bf16 tensor
(a :class:`RebuiltTensor`), so planning, per-expert splits and ``convert --op dequantize`` treat an MXFP4 release
as they treat the bf16 one; only the read differs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from qconvert.errors import BadInputError
from qconvert.microscaling import e2m1_values, e8m0_values, unpack_nibbles
from qconvert.safetensors_io import TensorInfo, TensorReader

MX_BLOCK = 32  # inputs per E8M0 scale
_BYTES_PER_BLOCK = MX_BLOCK // 2
_PAIR = re.compile(r"^(.*\.experts\.(?:gate_up_proj|down_proj))_(blocks|scales)$")


@dataclass(frozen=True)
class StoredExperts:
    """One 3-D expert tensor stored as MXFP4 blocks and E8M0 scales."""

    name: str  # the logical tensor, e.g. model.layers.0.mlp.experts.gate_up_proj
    blocks: TensorInfo
    scales: TensorInfo
    dtype: torch.dtype  # what it rebuilds into (the config's torch_dtype)

    @property
    def parts(self) -> list[TensorInfo]:
        return [self.blocks, self.scales]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The logical ``[experts, in, out]``, as the bf16 release stores it."""
        experts, rows, blocks, _ = self.blocks.shape
        return experts, blocks * MX_BLOCK, rows

    def rebuild(self, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """The weights ``[experts, in, out]`` in ``dtype``: code value times its block's power of two, computed
        in float32 (exact: a power-of-two product) and rounded once, as transformers' ``ldexp`` does."""
        if bool((scales == 255).any()):
            where = (scales == 255).nonzero()[0].tolist()
            raise BadInputError(f"{self.scales.file.name}: {self.scales.name} holds the E8M0 NaN (255) at {where}")
        experts, rows, count, _ = blocks.shape
        out = torch.empty((experts, count * MX_BLOCK, rows), dtype=self.dtype)
        for expert in range(experts):  # one expert at a time: the float32 temporaries stay small
            codes = unpack_nibbles(blocks[expert].reshape(rows, count * _BYTES_PER_BLOCK))
            values = e2m1_values(codes) * e8m0_values(scales[expert]).repeat_interleave(MX_BLOCK, dim=1)
            out[expert] = values.to(self.dtype).t()
        return out


@dataclass(frozen=True)
class RebuiltTensor(TensorInfo):
    """A tensor the planner sees that no file holds as such: it is rebuilt from ``source``'s stored parts."""

    source: StoredExperts


def find_stored_experts(tensors: dict[str, TensorInfo], dtype: torch.dtype) -> dict[str, StoredExperts]:
    """Every gpt-oss MXFP4 expert pair, by logical tensor name; a half pair or a malformed one is refused."""
    halves: dict[str, dict[str, TensorInfo]] = {}
    for name, info in tensors.items():
        match = _PAIR.match(name)
        if match:
            halves.setdefault(match.group(1), {})[match.group(2)] = info
    found = {}
    for name, pair in halves.items():
        blocks, scales = pair.get("blocks"), pair.get("scales")
        present = blocks or scales
        assert present is not None
        if blocks is None or scales is None:
            missing = f"{name}_{'scales' if scales is None else 'blocks'}"
            raise BadInputError(f"{present.file.name}: {present.name} has no {missing} beside it (gpt-oss MXFP4 "
                                "stores experts as a blocks/scales pair)")
        for info, rank in ((blocks, 4), (scales, 3)):
            if info.dtype != torch.uint8 or len(info.shape) != rank:
                raise BadInputError(f"{info.file.name}: {info.name} is {str(info.dtype).removeprefix('torch.')} "
                                    f"{list(info.shape)}; gpt-oss MXFP4 stores it as {rank}-D uint8")
        if blocks.shape[-1] != _BYTES_PER_BLOCK or blocks.shape[:3] != scales.shape or 0 in blocks.shape:
            raise BadInputError(f"{blocks.file.name}: {blocks.name} is {list(blocks.shape)} and {scales.name} "
                                f"{list(scales.shape)}; MXFP4 needs [E, R, G, 16] blocks and [E, R, G] scales")
        if name in tensors:
            plain = tensors[name]
            raise BadInputError(f"{plain.file.name}: {name} is stored both as a plain tensor and as MXFP4 "
                                f"({blocks.name}): which one is the model's is not for qconvert to guess")
        found[name] = StoredExperts(name, blocks, scales, dtype)
    return found


def check_scales(experts: dict[str, StoredExperts], reader: TensorReader) -> None:
    """Refuse an E8M0 NaN before any write: the scales are 1/17 of an MXFP4 tensor's bytes, so reading them all
    up front is cheap next to the run, and a NaN found mid-run would cost the work done so far."""
    for pair in experts.values():
        nan = reader.read(pair.scales) == 255
        if bool(nan.any()):
            raise BadInputError(f"{pair.scales.file.name}: {pair.scales.name} holds the E8M0 NaN (255) at "
                                f"{nan.nonzero()[0].tolist()}")


def rebuilt_view(experts: StoredExperts) -> RebuiltTensor:
    """The logical tensor of ``experts`` as the planner sees it (offset -1: never read as stored)."""
    shape = experts.shape
    return RebuiltTensor(experts.name, experts.dtype, shape, experts.blocks.file, -1,
                         shape[0] * shape[1] * shape[2] * experts.dtype.itemsize, experts)
