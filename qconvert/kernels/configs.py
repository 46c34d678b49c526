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
    split_k: int = 1  # K ranges computed by separate programs, summed by split_k.reduce_partials
    defer_scales: bool = False  # block GEMMs: scale K group k-1 while group k's MMAs run
    unpack_by_dots: bool | None = None  # weight-only GEMMs (see weight_only.py); None: when block_m < 64


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
    if m <= 16:
        block_n = 32 if n <= 8192 else 64
        # Split K until about two programs per SM of a 132-SM GPU stream weights, at least 4 K steps each.
        splits = max(1, min(8, 264 // -(-n // block_n), k // (4 * 128)))
        return TileConfig(16, block_n, 128, 1, 4, 4, splits)
    if m <= 64:
        return TileConfig(32 if m <= 32 else 64, 64, 128, 8, 4, 4)
    if m <= 256:
        return TileConfig(64, 128, 128, 8, 4, 4)
    return TileConfig(128, 128, 128, 8, 8, 3)


def gemm_config(kernel: str, m: int, n: int, k: int, device: torch.device) -> TileConfig:
    """The committed configuration for this GPU, N, K and M bucket, else :func:`fallback`.

    Under the CPU interpreter, tiles are kept small: its cost grows with tile area, not program count.
    """
    if interpreting() or device.type != "cuda":
        return TileConfig(16, 32, 64, 4, 4, 1)
    gpu = gpu_name(device)
    tuned = [bucket for bucket in M_BUCKETS if (gpu, kernel, n, k, bucket) in TUNED]
    if not tuned:
        return fallback(kernel, m, n, k)
    # The nearest tuned bucket at or above M (the largest for anything bigger).
    return TUNED[(gpu, kernel, n, k, next((b for b in tuned if m <= b), tuned[-1]))]
