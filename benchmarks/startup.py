"""Start-up of the commands that need no model: wall time of whole ``python -m qconvert`` processes.

    python benchmarks/startup.py [--repeats 5]

``--version``, ``--help``, ``schemes``, ``quantize --help`` and a rejected option must answer without
importing torch (its import alone is 1.5-4 s): each is run ``--repeats`` times and the median printed,
with whether torch was imported (``-X importtime`` of one more run). Target: 0.5 s each on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMANDS = (["--version"], ["--help"], ["schemes"], ["quantize", "--help"], ["--no-such-option"])


def run(args: list[str], *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *extra, "-m", "qconvert", *args], capture_output=True, text=True,
                          env=env, cwd=REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    print(f"| command | median wall (s), {repeats} runs | imports torch |")
    print("| --- | ---: | --- |")
    for args in COMMANDS:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run(args)
            times.append(time.perf_counter() - started)
        torch = "torch" in {line.split("|")[-1].strip() for line in run(args, "-X", "importtime").stderr.splitlines()}
        print(f"| `qconvert {' '.join(args)}` | {statistics.median(times):.2f} | {'yes' if torch else 'no'} |")


if __name__ == "__main__":
    main()
