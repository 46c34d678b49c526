"""Quantize a generated ~1.2 GB Llama-shaped checkpoint in every scheme and ``qconvert verify`` each one
against the original on the GPU; prints one line per scheme and writes the JSON reports.

    python benchmarks/verify_gpu.py --work /tmp/vg --out results/
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_speed import generate_checkpoint

SCHEMES = ["rtn4", "rtn8", "int8-block", "w8a8-int8", "fp8", "fp8-block", "fp8-tensor"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", default="1,16,128")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    source = generate_checkpoint(args.work / "llama-1b", layers=8)
    size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    print(f"checkpoint {source}: {size / 1e9:.2f} GB")
    summary = []
    for scheme in SCHEMES:
        target = args.work / scheme
        if not target.exists():
            subprocess.run([sys.executable, "-m", "qconvert", "quantize", str(source), "-s", scheme, "-o",
                            str(target), "-q"], check=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "qconvert", "verify", str(target), "--original", str(source),
                               "--device", "cuda", "--tokens", args.tokens, "--json"], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if not proc.stdout:
            print(f"{scheme}: exit {proc.returncode}: {proc.stderr.strip()}")
            summary.append({"scheme": scheme, "exit": proc.returncode, "error": proc.stderr.strip()})
            continue
        report = json.loads(proc.stdout)
        (args.out / f"verify-{scheme}.json").write_text(json.dumps(report, indent=1))
        layers = report["layers"]
        line = {
            "scheme": scheme, "exit": proc.returncode, "layers": len(layers), "failed": len(report["layers_failed"]),
            "path": layers[0]["path"], "max_kernel_ratio": max(x["kernel_ratio"] for x in layers),
            "max_weight_bound_ratio": max(x["weight_bound_ratio"] for x in layers),
            "min_weight_snr_db": min(x["weight_snr_db"] for x in layers),
            "min_output_snr_db": min(x["output_snr_db"] for x in layers), "seconds": round(seconds, 1),
        }
        summary.append(line)
        print(json.dumps(line))
    (args.out / "verify-summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
