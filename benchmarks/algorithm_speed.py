"""Cost of ``--algorithm search`` against round-to-nearest: whole-process wall time and peak RSS.

    python benchmarks/algorithm_speed.py [--work bench-work] [--repeats 3] [--schemes rtn4 int4-asym ...]

Uses convert_speed.py's generated ~1.7 GB bf16 Llama-shaped checkpoint (16 layers, 0.70 G linear parameters) and
runs ``python -m qconvert quantize CKPT -s S --algorithm A`` for each scheme and algorithm, alternating within each
round, page cache warm; prints the medians as a Markdown table with search / rtn4 and search / rtn of the scheme,
and the search's extra cost per linear parameter.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_speed import REPO, generate_checkpoint, run_measured


def run_timed(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds user + system, peak RSS MiB) of one whole process: on a shared machine the CPU
    time is the steadier figure."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024

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
            runs[(scheme, algorithm)].append(run_timed(
                [sys.executable, "-m", "qconvert", "quantize", str(ckpt), "-s", scheme, "--algorithm", algorithm,
                 "-o", str(out), "--quiet"]))
    wall = {k: statistics.median(s for s, _, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c, _ in v) for k, v in runs.items()}
    rss = {k: max(r for _, _, r in v) for k, v in runs.items()}
    base, base_cpu = wall[("rtn4", "rtn")], cpu[("rtn4", "rtn")]
    print(f"median of {args.repeats}; rtn4 (rtn) = {base:.2f} s wall, {base_cpu:.2f} s CPU; {os.cpu_count()} cores")
    print("| scheme | algorithm | wall (s) | CPU (s) | peak RSS (MiB) | wall / rtn4 | CPU / rtn4 | extra CPU ns per "
          "parameter |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (scheme, algorithm), seconds in wall.items():
        extra = (cpu[(scheme, algorithm)] - cpu[(scheme, "rtn")]) / LINEAR_PARAMS * 1e9
        used = cpu[(scheme, algorithm)]
        print(f"| {scheme} | {algorithm} | {seconds:.2f} | {used:.2f} | {rss[(scheme, algorithm)]:.0f} "
              f"| {seconds / base:.2f}x | {used / base_cpu:.2f}x | {extra:.1f} |")


if __name__ == "__main__":
    main()
