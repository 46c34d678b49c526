"""Peak memory of requantizing a DeepSeek-style FP8 checkpoint into int8-block (issue 3).

    python benchmarks/requantize_memory.py [--work bench-work]

Makes (once) a DeepSeek-V3-style FP8 copy of the benchmark's 1.7 GB bf16 Llama-shaped checkpoint
(every linear weight e4m3fn with fp32 128x128 `weight_scale_inv`, `quant_method: fp8`), then runs
`qconvert quantize FP8 --scheme int8-block` as a whole process and reports its time and peak RSS,
beside `cp -r` of the same FP8 checkpoint measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_speed import REPO, generate_checkpoint, run_measured


def make_deepseek_fp8(source: Path, folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qconvert.quantizers import quantize_tiles, tile_scales

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    for shard in sorted(source.glob("*.safetensors")):
        tensors = {}
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if name.endswith("_proj.weight"):
                    wide = tensor.float()
                    scales = tile_scales(wide, (128, 128), 448.0)
                    tensors[name] = quantize_tiles(wide, scales, (128, 128), "float")
                    tensors[name.removesuffix(".weight") + ".weight_scale_inv"] = scales
                else:
                    tensors[name] = tensor
        save_file(tensors, tmp / shard.name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard.name))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=REPO / "bench-work")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    fp8 = args.work / "llama-1.7b-shape-deepseek-fp8"
    if args.generate_only:
        make_deepseek_fp8(generate_checkpoint(args.work / "llama-1.7b-shape"), fp8)
        return
    # Generate in a child: a parent that grew large would hand its peak RSS to every child it forks.
    subprocess.run([sys.executable, __file__, "--work", str(args.work), "--generate-only"], check=True)
    size = sum(p.stat().st_size for p in fp8.glob("*.safetensors"))
    out, copy = args.work / "out-int8-block", args.work / "out-cp-fp8"
    runs: dict[str, list[tuple[float, float]]] = {"cp": [], "qconvert": []}
    run_measured(["sh", "-c", f"cat '{fp8}'/*.safetensors > /dev/null"])
    for _ in range(args.repeats):
        for name, target, cmd in (
            ("cp", copy, ["sh", "-c", f"cp -r '{fp8}' '{copy}' && sync"]),
            ("qconvert", out, [sys.executable, "-m", "qconvert", "quantize", str(fp8), "-s", "int8-block",
                               "-o", str(out), "--quiet"]),
        ):
            shutil.rmtree(target, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            runs[name].append(run_measured(cmd))
    cp_s = sorted(s for s, _ in runs["cp"])[len(runs["cp"]) // 2]
    q_s = sorted(s for s, _ in runs["qconvert"])[len(runs["qconvert"]) // 2]
    rss = max(r for _, r in runs["qconvert"])
    print(f"DeepSeek-style FP8 checkpoint: {size / 1e9:.2f} GB, 4 shards; median of {args.repeats}")
    print()
    print("| run | time (s) | peak RSS (MiB) |")
    print("| --- | --- | --- |")
    print(f"| `cp -r` + sync of the FP8 checkpoint | {cp_s:.2f} | – |")
    print(f"| qconvert quantize FP8 --scheme int8-block, whole process | {q_s:.2f} | {rss:.0f} |")
    print()
    print(f"all runs (s, MiB): {json.dumps({k: [(round(s, 2), round(r)) for s, r in v] for k, v in runs.items()})}")


if __name__ == "__main__":
    main()
