"""How ``--algorithm search``'s settings were chosen: on synthetic weights only, never on a quality figure.

    python benchmarks/search_design.py

Draws Gaussian and Student-t (3 and 5 degrees of freedom) weights, 1024 x 2048 in bf16 and float32 (seeded), and for
each int scheme (symmetric and asymmetric, 4 and 8 bits, groups of 128) and NVFP4 (blocks of 16; its grid is
"four over six") prints the weight-reconstruction objective
(the search's own: squared error of the stored reconstruction) of the grid alone and of the grid followed by 1-6
least-squares refits, and of a dense grid (with and without refits) as a reference, each as a share of RTN's error,
with the CPU time of the choice. The cheapest setting that gets most of what more refits would get is the default.
"""

from __future__ import annotations

import time

import torch

from qconvert.algorithms import (
    _asymmetric_error,
    _symmetric_error,
    _Workspace,
    group_sse,
    search_asymmetric,
    search_nvfp4_scales,
    search_symmetric,
)
from qconvert.microscaling import e2m1_codes, e2m1_values, nvfp4_block_scales, nvfp4_global_scale
from qconvert.quantizers import asymmetric_qparams, scale_divisor, scales_from_amax

GROUP = 128
DENSE_SYMMETRIC = {4: tuple(1.0 - 0.0125 * i for i in range(1, 33)), 8: tuple(1.0 - 0.00125 * i for i in range(1, 33))}
DENSE_ASYMMETRIC = {b: tuple((a, c) for a in (1.0, *s[1::3]) for c in (1.0, *s[1::3]) if (a, c) != (1.0, 1.0))
                    for b, s in DENSE_SYMMETRIC.items()}


def weights(kind: str, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if kind == "gaussian":
        w = torch.randn(1024, 2048, generator=gen)
    else:
        df = float(kind.removeprefix("t"))
        normal, chi = torch.randn(1024, 2048, generator=gen), torch.randn(int(df), 1024, 2048, generator=gen)
        w = normal / (chi.square().mean(0)).sqrt()
    return (w * 0.02).to(dtype)


def objective(w: torch.Tensor, bits: int, symmetric: bool, **settings: object) -> tuple[float, float]:
    rows, cols = w.shape
    groups = w.reshape(rows, cols // GROUP, GROUP)
    started = time.process_time()
    if symmetric:
        scales = search_symmetric(w, (1, GROUP), bits, **settings) if settings.get("refits", 0) >= 0 else \
            scales_from_amax(groups.abs().amax(-1), scale_divisor("int", bits), w.dtype)
        seconds = time.process_time() - started
        work = _Workspace(groups)  # after the search, which reuses this thread's buffers
        err = _symmetric_error(work, scales.float(), bits)
    else:
        mins, maxs = groups.amin(-1), groups.amax(-1)
        if settings.get("refits", 0) >= 0:
            scales, zeros = search_asymmetric(groups, mins, maxs, bits, **settings)
        else:
            scales, zeros = asymmetric_qparams(mins, maxs, bits)
        seconds = time.process_time() - started
        work = _Workspace(groups)  # after the search, which reuses this thread's buffers
        err = _asymmetric_error(work, scales.float(), zeros.float(), bits)
    return float(err.double().sum()), seconds


def nvfp4_objective(w: torch.Tensor, refits: int) -> tuple[float, float]:
    """The NVFP4 search (four over six, then ``refits`` refits; -1: RTN) and the objective it minimises."""
    blocks = w.reshape(w.shape[0], -1, 16)
    amax = blocks.abs().amax(-1)
    global_scale = nvfp4_global_scale(w.abs().amax(), w.dtype)
    started = time.process_time()
    if refits < 0:
        scales = nvfp4_block_scales(amax, global_scale)
    else:
        scales = search_nvfp4_scales(blocks, amax, global_scale, refits=refits)
    seconds = time.process_time() - started
    multiplier = (scales.to(torch.float32) / global_scale).unsqueeze(-1)
    rebuilt = (e2m1_values(e2m1_codes(blocks / multiplier)) * multiplier).to(w.dtype)
    return float(group_sse(rebuilt, blocks).double().sum()), seconds


def main() -> None:
    torch.set_num_threads(1)
    configs = [("grid", {"refits": 0})] + [(f"grid + {n} refits", {"refits": n}) for n in (1, 2, 3, 4, 6)]
    names = " | ".join(name for name, _ in configs)
    print(f"| weights | dtype | scheme | {names} | dense grid | dense + 2 refits |")
    print("|" + "---|" * (len(configs) + 5))
    for kind in ("gaussian", "t5", "t3"):
        for dtype in (torch.bfloat16, torch.float32):
            w = weights(kind, dtype)
            for bits in (4, 8):
                for symmetric in (True, False):
                    rtn, rtn_s = objective(w, bits, symmetric, refits=-1)
                    dense = DENSE_SYMMETRIC[bits] if symmetric else DENSE_ASYMMETRIC[bits]
                    cells = []
                    for _, settings in [*configs, ("dense", {"refits": 0, "shrink": dense}),
                                        ("dense+", {"refits": 2, "shrink": dense})]:
                        err, seconds = objective(w, bits, symmetric, **settings)
                        cells.append(f"{err / rtn:.4f} ({seconds:.2f}s)")
                    scheme = f"int{bits}{'' if symmetric else '-asym'}"
                    print(f"| {kind} | {str(dtype)[6:]} | {scheme} (rtn {rtn_s:.2f}s) | " + " | ".join(cells) + " |")
            rtn, rtn_s = nvfp4_objective(w, -1)
            cells = []
            for _, settings in configs:
                err, seconds = nvfp4_objective(w, settings["refits"])
                cells.append(f"{err / rtn:.4f} ({seconds:.2f}s)")
            print(f"| {kind} | {str(dtype)[6:]} | nvfp4 (rtn {rtn_s:.2f}s) | " + " | ".join(cells) + " | | |")


if __name__ == "__main__":
    main()
