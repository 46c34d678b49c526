"""GEMM kernel benchmark (and tuner) on a CUDA GPU: qconvert's Triton kernels against cuBLAS in the same run.

    python benchmarks/gemm.py --out DIR            # the table: ours, the baselines, the ratios
    python benchmarks/gemm.py --tune --out DIR     # search tile configs; writes DIR/tuned_configs.json

Shapes are ANCHORS.md's (weights N x K; activations M x K). Times are medians of CUDA-graph replays
(see ``bench``), for our kernels and the baselines alike.
TFLOP/s (TOP/s for int8) count 2*M*N*K. The int8 block GEMM includes nothing but the GEMM (activation
quantization is timed separately, as its own kernel), like the seed figure in ANCHORS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
from pathlib import Path

import torch
import triton

from qconvert import kernels
from qconvert.kernels.configs import TileConfig, gemm_config, m_bucket
from qconvert.quantizers import quantize_and_pack_symmetric, quantize_tiled

SHAPES = [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (8192, 8192)]
MS = [1, 16, 128, 1024, 4096]


def bench(fn, rep: int = 5) -> float:
    """Milliseconds per call, from CUDA-graph replays: serving replays graphs, so the host's launch cost
    (which dominates a 10 µs GEMV, and differs between a Triton launch and a cuBLAS call) is left out."""
    fn()  # compile, and let the caching allocator settle
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    calls = int(min(200, max(5, 2.0 / max(start.elapsed_time(end), 1e-3))))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
        graph.replay()
        times = []
        for _ in range(rep):
            start.record(stream)
            graph.replay()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def tflops(m: int, n: int, k: int, ms: float) -> float:
    return 2 * m * n * k / ms / 1e9


def operands(m: int, n: int, k: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    ops = {"x": x, "w": w}
    ops["a8"], ops["as8"] = kernels.quantize_activations(x, 128, "int")
    ops["w8"], ops["ws8"] = kernels.quantize_weight_blocks(w, (128, 128), "int")
    ops["af"], ops["asf"] = kernels.quantize_activations(x, 128, "float")
    ops["wf"], ops["wsf"] = kernels.quantize_weight_blocks(w, (128, 128), "float")
    ops["p4"], ops["ps4"] = quantize_and_pack_symmetric(w, 4, 128)
    ops["a8t"], ops["as8t"] = kernels.quantize_activations(x, 10**9, "int")
    ops["w8c"], ops["ws8c"] = quantize_tiled(w, (1, k), "int")
    ops["afr"], ops["asfr"] = kernels.quantize_activations(x, 10**9, "float")
    wfr = (w.float() / (w.float().abs().amax(1, keepdim=True) / 448)).clamp(-448, 448).to(torch.float8_e4m3fn)
    ops["wfr"], ops["wsfr"] = wfr, (w.float().abs().amax(1, keepdim=True) / 448)
    return ops


def our_kernels(ops: dict, k: int) -> dict:
    return {
        "int8-block": lambda cfg=None: kernels.scaled_gemm(ops["a8"], ops["as8"], ops["w8"], ops["ws8"], config=cfg),
        "fp8-block": lambda cfg=None: kernels.scaled_gemm(ops["af"], ops["asf"], ops["wf"], ops["wsf"], config=cfg),
        "w4a16": lambda cfg=None: kernels.packed_gemm(ops["x"], ops["p4"], ops["ps4"], 4, k, config=cfg),
    }


def candidates(kernel: str, m: int) -> list[TileConfig]:
    """The search space per M range: small M streams weights (narrow tiles, deep pipelines, split-K to
    fill the SMs); large M is compute bound (wgmma tiles: per-program M a multiple of 64, 4 or 8 warps)."""
    weight_only = kernel == "w4a16"
    bks = (128, 256) if weight_only else (128,)
    defer = (False,) if weight_only else (False, True)
    if m <= 16 and weight_only:
        return [TileConfig(16, bn, bk, 1, 4, 4, split, unpack_by_dots=by_dots) for bn in (32, 64, 128) for bk in bks
                for split in (1, 2, 4) for by_dots in ((True,) if bn < 64 else (True, False))]
    if m <= 16:
        return [TileConfig(16, bn, 128, 1, 4, 4, split, d) for bn in (32, 64, 128) for split in (1, 2, 4, 8)
                for d in defer]
    if m <= 256:
        return [TileConfig(bm, bn, bk, 8, warps, stages, split, d)
                for bm, bn in ((64, 64), (64, 128), (128, 128)) for bk in bks for warps, stages in ((4, 4), (8, 3))
                for split in ((1,) if weight_only else (1, 2)) for d in defer]
    return [TileConfig(bm, bn, 128, 8, warps, stages, 1, d)
            for bm, bn in ((128, 128), (128, 256), (256, 128)) for warps, stages in ((8, 3), (8, 4), (4, 4))
            for d in defer]


def tune(out_dir: Path) -> None:
    gpu = torch.cuda.get_device_name()
    rows = []
    for n, k in SHAPES:
        for m in MS:
            ops = operands(m, n, k)
            for kernel, fn in our_kernels(ops, k).items():
                best = None
                for cfg in candidates(kernel, m):
                    try:
                        ms = bench(lambda cfg=cfg, fn=fn: fn(cfg), rep=3)
                    except Exception as exc:  # out of shared memory / registers: skip that config
                        print(f"  skip {cfg}: {type(exc).__name__}", file=sys.stderr)
                        continue
                    if best is None or ms < best[0]:
                        best = (ms, cfg)
                if best is None:
                    continue
                rows.append({"gpu": gpu, "kernel": kernel, "n": n, "k": k, "m_bucket": m_bucket(m),
                             "config": best[1].__dict__, "ms": best[0]})
                print(f"tune {kernel} M={m} N={n} K={k}: {best[1]} {tflops(m, n, k, best[0]):.0f} TFLOP/s", flush=True)
                (out_dir / "tuned_configs.json").write_text(json.dumps(rows, indent=1))
            del ops
            torch.cuda.empty_cache()
    (out_dir / "tuned_configs.json").write_text(json.dumps(rows, indent=1))


def copy_bandwidth() -> float:
    """GB/s (read + write) of an elementwise kernel over 1 GiB: the device's achievable copy bandwidth.
    (Not ``copy_``: inside a CUDA graph that becomes a memcpy node served by the copy engines, slower.)"""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: torch.bitwise_not(src, out=dst))
    return 2 * src.numel() / ms / 1e6


def compile_report() -> list[str]:
    """What Triton compiled for every GEMM variant run so far: tile, registers, spills, shared memory,
    the MMA instructions in the PTX (wgmma on Hopper, else mma.sync) and how many wgmma waits the code
    holds (the block kernels must wait on each K group's MMAs before scaling them)."""
    from qconvert.kernels.gemm import _scaled_gemm_kernel
    from qconvert.kernels.weight_only import _packed_gemm_kernel

    lines = ["| kernel | operands | BM×BN×BK | warps | stages | split-K | deferred scales / unpack by dots | regs | "
             "spills | shared KiB | MMA | wgmma waits |", "|" + " --- |" * 12]
    for fn in (_scaled_gemm_kernel, _packed_gemm_kernel):
        for caches in fn.device_caches.values():
            for compiled in caches[0].values():
                names = compiled.src.fn.arg_names
                const = {names[key[0]]: value for key, value in compiled.src.constants.items() if len(key) == 1}
                ptx = compiled.asm.get("ptx", "")
                mma = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.([\w.]+)", ptx)))
                mma = mma or sorted(set(re.findall(r"mma\.sync\.aligned\.([\w.]+)", ptx)))
                meta = compiled.metadata
                lines.append(
                    f"| {compiled.name} | {compiled.src.signature.get('a_ptr', compiled.src.signature.get('x_ptr'))} | "
                    f"{const.get('BLOCK_M')}×{const.get('BLOCK_N')}×{const.get('BLOCK_K')} | {meta.num_warps} | "
                    f"{meta.num_stages} | {const.get('SPLIT_K')} | "
                    f"{const.get('DEFER_SCALES', const.get('UNPACK_BY_DOTS'))} | {compiled.n_regs} | "
                    f"{compiled.n_spills} | "
                    f"{meta.shared / 1024:.0f} | {', '.join(mma) or '–'} | {ptx.count('wgmma.wait_group')} |")
    return lines


def measure(m: int, n: int, k: int, one: torch.Tensor) -> dict:
    """One table row: our kernels and the cuBLAS baselines on one shape (TFLOP/s)."""
    ops = operands(m, n, k)
    mine = our_kernels(ops, k)
    r = {"m": m, "n": n, "k": k}

    if m > 16:
        w8t = ops["w8"].T
        r["int_mm"] = tflops(m, n, k, bench(lambda: torch._int_mm(ops["a8"], w8t)))
    r["fp8_tensor"] = tflops(m, n, k, bench(lambda: torch._scaled_mm(
        ops["afr"], ops["wfr"].T, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)))
    sa, sb = ops["asfr"].reshape(m, 1).contiguous(), ops["wsfr"].reshape(1, n).contiguous()
    r["fp8_rowwise"] = tflops(m, n, k, bench(lambda: torch._scaled_mm(
        ops["afr"], ops["wfr"].T, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)))
    r["bf16_ms"] = bench(lambda: ops["x"] @ ops["w"].T)
    r["bf16"] = tflops(m, n, k, r["bf16_ms"])
    for name, fn in mine.items():
        r[f"{name}_ms"] = bench(fn)
        r[name] = tflops(m, n, k, r[f"{name}_ms"])
    # The same kernel with per-channel weight and per-token activation scales: int32 accumulation over
    # all of K, no per-group promotion. Its gap to the block kernel is what the promotion costs.
    r["int8-channel"] = tflops(m, n, k, bench(lambda: kernels.scaled_gemm(ops["a8t"], ops["as8t"], ops["w8c"],
                                                                           ops["ws8c"])))
    quant_ms = bench(lambda: kernels.scaled_gemm_quant(ops["a8"], ops["as8"], ops["w8"], ops["ws8"]))
    r["gemm_quant_over_gemm"] = quant_ms / r["int8-block_ms"]
    r["config_int8"] = gemm_config("int8-block", m, n, k, ops["x"].device).__dict__
    ops.clear()  # free the operands before the next shape
    torch.cuda.empty_cache()
    return r


def table(out_dir: Path) -> None:
    gpu = torch.cuda.get_device_name()
    lines = [f"GPU {gpu}, torch {torch.__version__}, triton {triton.__version__}, "
             f"{datetime.date.today().isoformat()}, `python benchmarks/gemm.py --out DIR`", ""]
    header = ("| M | N×K | bf16 | _int_mm | fp8 tensor | fp8 rowwise | ours int8 block | ours fp8 block | "
              "ours W4A16 | int8/_int_mm | int8/bf16 | fp8/rowwise | fp8/bf16 | W4A16/bf16 | gemm_quant/gemm |")
    lines += [header, "|" + " --- |" * 15]
    results = []
    one = torch.ones((), device="cuda")
    for n, k in SHAPES:
        for m in MS:
            r = measure(m, n, k, one)
            results.append(r)

            def ratio(a: str, b: str, r: dict = r) -> str:
                return f"{r[a] / r[b]:.2f}" if a in r and b in r else "–"

            lines.append(
                f"| {m} | {n}×{k} | {r['bf16']:.0f} | {r.get('int_mm', float('nan')):.0f} | {r['fp8_tensor']:.0f} | "
                f"{r['fp8_rowwise']:.0f} | {r['int8-block']:.0f} | {r['fp8-block']:.0f} | {r['w4a16']:.0f} | "
                f"{ratio('int8-block', 'int_mm')} | {ratio('int8-block', 'bf16')} | "
                f"{ratio('fp8-block', 'fp8_rowwise')} | "
                f"{ratio('fp8-block', 'bf16')} | {ratio('w4a16', 'bf16')} | {r['gemm_quant_over_gemm']:.2f} |")
            print(lines[-1], flush=True)
    lines += ["", "Where the large-M block-GEMM time goes: the same Triton kernel with per-channel scales (one int32",
              "accumulation over K, no per-group wait and promotion) against the block-scaled one (TOP/s):", "",
              "| M | N×K | _int_mm | ours int8 channel | ours int8 block | channel/_int_mm | block/channel |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if r["m"] >= 128:
            lines.append(f"| {r['m']} | {r['n']}×{r['k']} | {r['int_mm']:.0f} | {r['int8-channel']:.0f} | "
                         f"{r['int8-block']:.0f} | {r['int8-channel'] / r['int_mm']:.2f} | "
                         f"{r['int8-block'] / r['int8-channel']:.2f} |")
    copy = copy_bandwidth()
    # Small M reads the weights once and does little else: GB/s of weight (plus scale) bytes against the
    # device's copy bandwidth says how far each kernel is from the memory bound.
    lines += ["", f"Weight streaming at small M (GB/s of weight + scale bytes; copy bandwidth {copy:.0f} GB/s):", "",
              "| M | N×K | bf16 | int8 block | fp8 block | W4A16 | W4A16 / copy |", "| --- |" * 1 + " --- |" * 6]
    for r in results:
        if r["m"] > 16:
            continue
        nk = r["n"] * r["k"]
        sizes = {"bf16": 2 * nk, "int8-block": nk + 4 * nk // 16384, "fp8-block": nk + 4 * nk // 16384,
                 "w4a16": nk // 2 + 2 * nk // 128}
        gbs = {name: size / r[f"{name}_ms"] / 1e6 for name, size in sizes.items()}
        lines.append(f"| {r['m']} | {r['n']}×{r['k']} | {gbs['bf16']:.0f} | {gbs['int8-block']:.0f} | "
                     f"{gbs['fp8-block']:.0f} | {gbs['w4a16']:.0f} | {gbs['w4a16'] / copy:.2f} |")
    quant_rows = []
    for m, k in ((4096, 4096), (4096, 14336), (16384, 8192)):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        for kind in ("int", "float"):
            ms = bench(lambda x=x, kind=kind: kernels.quantize_activations(x, 128, kind))
            moved = m * k * 2 + m * k + m * (-(-k // 128)) * 4
            quant_rows.append(f"| {m}×{k} | {kind} | {moved / ms / 1e6:.0f} GB/s | {moved / ms / 1e6 / copy:.2f} |")
    lines += ["", f"Activation quantization (per token per 128, bf16 in), device copy bandwidth {copy:.0f} GB/s "
              "(read + write):", "", "| M×K | codes | bandwidth | / copy |", "| --- | --- | --- | --- |", *quant_rows]
    lines += ["", "Compiled variants (profile evidence for the gaps; from Triton's compile metadata and PTX):", "",
              *compile_report()]
    text = "\n".join(lines)
    print(text)
    (out_dir / "gemm_table.md").write_text(text + "\n")
    (out_dir / "gemm_results.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--tune", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{platform.node()} {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    if args.tune:
        tune(args.out)
    else:
        table(args.out)


if __name__ == "__main__":
    main()
