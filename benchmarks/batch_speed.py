"""A two-scheme batch job (one read of the model) against two separate `qconvert quantize` runs.

    python benchmarks/batch_speed.py [--work bench-work] [--repeats 3] [--schemes rtn4,fp8-block]

Uses the ~1.7 GB bf16 Llama-shaped checkpoint of benchmarks/convert_speed.py (generated once into
--work). Each variant runs as whole processes (imports included), alternating, repeated; the median
is reported:

* separate: `qconvert quantize CKPT -s A` then `qconvert quantize CKPT -s B` (two processes);
* batch: `qconvert batch jobs.yaml --force` with `schemes: [A, B]` (one process, one read).

Bytes read are each process's `rchar` from /proc/self/io (every read/pread/copy_file_range byte,
whether served from the page cache or the disk, plus the interpreter's own file reads), summed over the
processes of a variant. The page cache cannot be dropped here (no root over the host), so the
checkpoint is read once before timing and every run reads it from memory; on a cold cache the batch's
one read saves more. The outputs of both variants are checked to be byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_speed import generate_checkpoint  # noqa: E402  (the benchmarks folder is not a package)

# Runs the CLI and, at exit, records the process's I/O counters (rchar: bytes read through syscalls).
CHILD = """
import atexit, os, sys
def _dump():
    with open(os.environ["QCONVERT_BENCH_IO"], "w") as f:
        f.write(open("/proc/self/io").read())
atexit.register(_dump)
from qconvert.cli import main
main(sys.argv[1:])
"""


def run(args: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds (user + system), bytes read) of one whole `qconvert` process."""
    with tempfile.NamedTemporaryFile("r", suffix=".io") as io_file, tempfile.TemporaryFile("w+") as err:
        env = {**os.environ, "QCONVERT_BENCH_IO": io_file.name}
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"failed ({proc.returncode}): qconvert {' '.join(args)}\n{err.read()[-2000:]}")
        counters = dict(line.split(": ") for line in Path(io_file.name).read_text().splitlines())
    return seconds, usage.ru_utime + usage.ru_stime, int(counters["rchar"])


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".qconvert-fingerprint.json"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=REPO / "bench-work")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--schemes", default="rtn4,fp8-block")
    args = parser.parse_args()
    schemes = args.schemes.split(",")
    ckpt = generate_checkpoint(args.work / "llama-1.7b-shape")
    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    for shard in ckpt.glob("*.safetensors"):  # warm the page cache equally for both variants
        with shard.open("rb") as f:
            while f.read(64 << 20):
                pass
    load_before = os.getloadavg()[0]
    out = args.work / "batch-speed"
    shutil.rmtree(out, ignore_errors=True)
    jobs = out / "jobs.yaml"
    out.mkdir(parents=True)
    jobs.write_text(json.dumps({"jobs": [{"model": str(ckpt), "schemes": schemes,
                                          "output": str(out / "batch" / "{scheme}")}]}))

    times: dict[str, list[float]] = {"separate": [], "batch": []}
    cpu: dict[str, list[float]] = {"separate": [], "batch": []}
    reads: dict[str, list[int]] = {"separate": [], "batch": []}
    for _ in range(args.repeats):
        total_s, total_cpu, total_read = 0.0, 0.0, 0
        for scheme in schemes:
            seconds, cpu_s, read = run(["quantize", str(ckpt), "-s", scheme, "-o", str(out / "separate" / scheme),
                                        "-q", "--overwrite"])
            total_s, total_cpu, total_read = total_s + seconds, total_cpu + cpu_s, total_read + read
        times["separate"].append(total_s)
        cpu["separate"].append(total_cpu)
        reads["separate"].append(total_read)
        seconds, cpu_s, read = run(["batch", str(jobs), "--force", "--quiet", "--report", str(out / "report.jsonl")])
        times["batch"].append(seconds)
        cpu["batch"].append(cpu_s)
        reads["batch"].append(read)

    identical = all(digest(out / "separate" / s) == digest(out / "batch" / s) for s in schemes)
    sep, bat = statistics.median(times["separate"]), statistics.median(times["batch"])
    sep_read, bat_read = statistics.median(reads["separate"]), statistics.median(reads["batch"])
    print(f"checkpoint: {ckpt} ({size / 1e9:.2f} GB of shards); schemes {'+'.join(schemes)}; "
          f"{args.repeats} repeats, median; {platform.node()} {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}; load average {load_before:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end")
    print("page cache warm for every run (it cannot be dropped here)")
    print()
    sep_cpu, bat_cpu = statistics.median(cpu["separate"]), statistics.median(cpu["batch"])
    print("| variant | wall s (median) | wall s, all runs | CPU s (median) | CPU s, all runs | bytes read (rchar) |")
    print("| --- | ---: | --- | ---: | --- | ---: |")
    for label, key in ((f"{len(schemes)} separate `quantize` runs", "separate"),
                       (f"one `batch` job, `schemes: [{', '.join(schemes)}]`", "batch")):
        print(f"| {label} | {statistics.median(times[key]):.2f} | {', '.join(f'{t:.2f}' for t in times[key])} | "
              f"{statistics.median(cpu[key]):.2f} | {', '.join(f'{t:.2f}' for t in cpu[key])} | "
              f"{statistics.median(reads[key]) / 1e9:.2f} GB |")
    print()
    print(f"batch / separate: wall time {bat / sep:.3f}x (target < 0.8x), CPU time {bat_cpu / sep_cpu:.3f}x, "
          f"bytes read {bat_read / sep_read:.3f}x; outputs byte-identical: {identical}")
    if not identical:
        raise SystemExit("the batch outputs differ from the separate runs")


if __name__ == "__main__":
    main()
