"""One launch of each GEMM whose speed misses an issue-5 target, for Nsight Compute.

    ncu --profile-from-start off --section SpeedOfLight --section WarpStateStats \\
        --section ComputeWorkloadAnalysis python benchmarks/profile_gemm.py

Operands are built and every kernel compiled before profiling starts, so the report holds exactly the
kernels below (with the shipped tile configurations), in this order:
1-2. int8 block GEMM and the same kernel with per-channel scales, M = N = K = 4096;
3.   cuBLAS bf16 GEMM, M = 16, N = 28672, K = 4096, then 4. our W4A16 GEMM on the same shape;
5.   int8 block GEMM, M = 16, N = 4096, K = 4096 (split-K: the GEMM and its reduction).
"""

from __future__ import annotations

import torch

from qconvert import kernels
from qconvert.quantizers import quantize_and_pack_symmetric, quantize_tiled


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, device="cuda", generator=g) * scale).to(torch.bfloat16)

    x, w = rand(4096, 4096), rand(4096, 4096, scale=0.02)
    a8, as8 = kernels.quantize_activations(x, 128, "int")
    w8, ws8 = kernels.quantize_weight_blocks(w, (128, 128), "int")
    a8t, as8t = kernels.quantize_activations(x, 10**9, "int")
    w8c, ws8c = quantize_tiled(w, (1, 4096), "int")
    x16, w_big = rand(16, 4096), rand(28672, 4096, scale=0.02)
    packed, pscales = quantize_and_pack_symmetric(w_big, 4, 128)
    calls = [
        lambda: kernels.scaled_gemm(a8, as8, w8, ws8),
        lambda: kernels.scaled_gemm(a8t, as8t, w8c, ws8c),
        lambda: x16 @ w_big.T,
        lambda: kernels.packed_gemm(x16, packed, pscales, 4, 4096),
        lambda: kernels.scaled_gemm(a8[:16], as8[:16], w8, ws8),
    ]
    for call in calls:  # compile and warm up outside the profiled range
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for call in calls:
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
