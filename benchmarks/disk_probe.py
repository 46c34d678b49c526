"""How fast the output disk takes ~4 GB (what fp8-block writes for the 7.5 GB checkpoint), written several
ways, each followed by fsync: is qconvert's write path at the disk's speed, or would another way go faster?

    python benchmarks/disk_probe.py --dir /tmp/probe [--gib 4] [--threads 8]

Variants: one thread buffered (as `cp`); N threads buffered pwrite into one file, with and without
sync_file_range(WRITE) after each chunk (qconvert's engine does the former); N threads into N files;
N threads O_DIRECT into one file. Every variant writes the same random 64 MiB buffer repeatedly,
then fsyncs; the file is removed and `sync` run (untimed) between variants. No torch.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import mmap
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 64 << 20
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def _buffer() -> mmap.mmap:
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(CHUNK))
    return buf


def _write_chunks(fds: list[int], chunks: int, threads: int, buf: mmap.mmap, writeback: bool) -> None:
    view = memoryview(buf)

    def job(index: int) -> None:
        fd = fds[index % len(fds)]
        offset = (index // len(fds)) * CHUNK
        done = 0
        while done < CHUNK:
            done += os.pwrite(fd, view[done:], offset + done)
        if writeback:
            _libc.sync_file_range(fd, offset, CHUNK, 2)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(job, range(chunks)))
    with ThreadPoolExecutor(len(fds)) as pool:
        list(pool.map(os.fsync, fds))


def variant(folder: Path, name: str, chunks: int, threads: int, files: int, direct: bool, writeback: bool,
            buf: mmap.mmap) -> float:
    paths = [folder / f"{name}-{i}" for i in range(files)]
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    started = time.perf_counter()
    fds = [os.open(p, flags, 0o644) for p in paths]
    try:
        _write_chunks(fds, chunks, threads, buf, writeback)
    finally:
        for fd in fds:
            os.close(fd)
    seconds = time.perf_counter() - started
    for p in paths:
        p.unlink()
    subprocess.run(["sync"], check=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    chunks = int(args.gib * (1 << 30)) // CHUNK
    gb = chunks * CHUNK / 1e9
    buf = _buffer()
    n = args.threads
    variants = [
        ("1 thread buffered", 1, 1, False, False),
        (f"{n} threads buffered, 1 file, sync_file_range", n, 1, False, True),
        (f"{n} threads buffered, 1 file", n, 1, False, False),
        (f"{n} threads buffered, {n} files, sync_file_range", n, n, False, True),
        (f"{n} threads O_DIRECT, 1 file", n, 1, True, False),
    ]
    print(f"{gb:.2f} GB per variant, then fsync; {args.repeats} repeat(s), alternating", flush=True)
    results: dict[str, list[float]] = {label: [] for label, *_ in variants}
    for _ in range(args.repeats):
        for index, (label, threads, files, direct, writeback) in enumerate(variants):
            try:
                results[label].append(variant(args.dir, f"v{index}", chunks, threads, files, direct, writeback, buf))
            except OSError as exc:
                print(f"{label}: {exc}", flush=True)
    for label, runs in results.items():
        if runs:
            print(f"{label}: {', '.join(f'{s:.2f}' for s in runs)} s -> best {gb / min(runs):.2f} GB/s", flush=True)


if __name__ == "__main__":
    main()
