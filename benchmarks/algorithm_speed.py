"""Cost of ``--algorithm search`` against round-to-nearest: whole-process wall time and peak RSS.

    python benchmarks/algorithm_speed.py [--work bench-work] [--repeats 3] [--schemes rtn4 int4-asym ...]

Uses convert_speed.py's generated ~1.7 GB bf16 Llama-shaped checkpoint (16 layers, 0.70 G linear parameters) and
runs ``python -m qconvert quantize CKPT -s S --algorithm A`` for each scheme and algorithm, alternating within each
round, page cache warm; prints the medians as a Markdown table with search / rtn4 and search / rtn of the scheme,
and the search's extra cost per linear parameter.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_speed import REPO, generate_checkpoint, run_measured

LINEAR_PARAMS = 16 * (2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632)  # q, o; k, v; gate, up, down


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=REPO / "bench-work")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--schemes", nargs="+", default=["rtn4", "int4-asym", "rtn8", "int8-asym"])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = generate_checkpoint(args.work / "llama-1.7b-shape")
    out = args.work / "out-algorithm"
    runs = {(s, a): [] for s in dict.fromkeys(["rtn4", *args.schemes]) for a in ("rtn", "search")}
    run_measured(["sh", "-c", f"cat '{ckpt}'/*.safetensors > /dev/null"])
    for _ in range(args.repeats):
        for scheme, algorithm in runs:
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            runs[(scheme, algorithm)].append(run_measured(
                [sys.executable, "-m", "qconvert", "quantize", str(ckpt), "-s", scheme, "--algorithm", algorithm,
                 "-o", str(out), "--quiet"]))
    wall = {k: statistics.median(s for s, _ in v) for k, v in runs.items()}
    rss = {k: max(r for _, r in v) for k, v in runs.items()}
    base = wall[("rtn4", "rtn")]
    print(f"median of {args.repeats}; rtn4 (rtn) = {base:.2f} s")
    print("| scheme | algorithm | wall (s) | peak RSS (MiB) | / rtn4 | / same scheme rtn | extra ns per parameter |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (scheme, algorithm), seconds in wall.items():
        extra = (seconds - wall[(scheme, "rtn")]) / LINEAR_PARAMS * 1e9
        print(f"| {scheme} | {algorithm} | {seconds:.2f} | {rss[(scheme, algorithm)]:.0f} | {seconds / base:.2f}x | "
              f"{seconds / wall[(scheme, 'rtn')]:.2f}x | {extra:.1f} |")


if __name__ == "__main__":
    main()
