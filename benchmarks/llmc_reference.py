"""Run llm-compressor's model_free_ptq (the reference tool) on a checkpoint.

Run it with an interpreter that has llmcompressor installed (its pins conflict with ours, so the
benchmark keeps it in a separate virtual environment):

    python benchmarks/llmc_reference.py MODEL OUT --scheme rtn4 [--ignore PATTERN ...]
"""

from __future__ import annotations

import argparse
import time

# qconvert schemes whose bytes are those of an llm-compressor preset.
PRESETS = {"fp8-block": "FP8_BLOCK", "nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16", "mxfp8": "MXFP8A16"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--scheme", choices=["rtn4", "rtn8", "fp8-block", *PRESETS], default="rtn4")
    parser.add_argument("--ignore", action="append", default=[])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (model_free_ptq's device)")
    args = parser.parse_args()

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import model_free_ptq

    bits = 4 if args.scheme == "rtn4" else 8
    scheme: QuantizationScheme | str = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=128),
    )
    if args.scheme in PRESETS:
        scheme = PRESETS[args.scheme]
    started = time.perf_counter()
    model_free_ptq(args.model, args.output, scheme=scheme, ignore=args.ignore, max_workers=args.workers,
                   device=args.device)
    print(f"model_free_ptq seconds (inside Python): {time.perf_counter() - started:.3f}")


if __name__ == "__main__":
    main()
