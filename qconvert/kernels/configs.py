"""Tile configurations for the GEMM kernels: a table tuned on the GPU, and a fallback for the rest.

Keys are ``(gpu, kernel, N, K, M bucket)``. The table is filled by ``benchmarks/gemm.py --tune`` on the
GPU and committed (``TUNED`` below); a shape or GPU that is not in it gets :func:`fallback`, which is
a rule of thumb (not yet tuned from measurements: BENCHMARKS.md). Nothing is autotuned at run time, so
``qconvert verify`` never pauses to search configurations.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def launch(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "GROUP_M": self.group_m,
                "num_warps": self.num_warps, "num_stages": self.num_stages}


M_BUCKETS = (1, 16, 32, 64, 128, 256, 512, 1024, 4096)


def m_bucket(m: int) -> int:
    """The smallest bucket holding ``m`` (the largest bucket for anything bigger)."""
    return next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])


TUNED_FILE = Path(__file__).with_name("tuned_configs.json")


def load_tuned(path: Path = TUNED_FILE) -> dict[tuple[str, str, int, int, int], TileConfig]:
    """``(gpu name, kernel, N, K, M bucket) -> config`` from the committed table (kernels: int8-block,
    fp8-block, w4a16, ...), written by ``benchmarks/gemm.py --tune`` on the GPU (see BENCHMARKS.md)."""
    if not path.is_file():
        return {}
    table = {}
    for row in json.loads(path.read_text()):
        key = (row["gpu"], row["kernel"], row["n"], row["k"], row["m_bucket"])
        table[key] = TileConfig(**row["config"])
    return table


TUNED = load_tuned()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def gpu_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device)


def fallback(kernel: str, m: int, n: int, k: int) -> TileConfig:
    """A sensible configuration for shapes the table does not hold.

    Large M: 128x128 (int8/fp8: BLOCK_K 128, one scale per K step) with 8 warps, so Triton issues
    wgmma on Hopper (per-program M a multiple of 64, warps a multiple of 4). Small M is bound by
    reading weights: narrow N tiles give enough programs to keep every SM streaming.
    """
    weight_only = kernel in ("w4a16", "w8a16")
    if m <= 16:
        return TileConfig(16, 32 if n <= 8192 else 64, 128, 1, 4, 4)
    if m <= 64:
        return TileConfig(32 if m <= 32 else 64, 64, 128, 8, 4, 4)
    if m <= 256:
        return TileConfig(64, 128, 128 if not weight_only else 64, 8, 4, 4)
    return TileConfig(128, 128, 128 if not weight_only else 64, 8, 8, 3)


def gemm_config(kernel: str, m: int, n: int, k: int, device: torch.device) -> TileConfig:
    """The committed configuration for this GPU and shape, else :func:`fallback`.

    Under the CPU interpreter, tiles are kept small: its cost grows with tile area, not program count.
    """
    if interpreting() or device.type != "cuda":
        return TileConfig(16, 32, 32 if kernel in ("w4a16", "w8a16") else 64, 4, 4, 1)
    return TUNED.get((gpu_name(device), kernel, n, k, m_bucket(m))) or fallback(kernel, m, n, k)
