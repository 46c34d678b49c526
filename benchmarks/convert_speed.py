"""Whole-checkpoint conversion: qconvert vs llm-compressor's model_free_ptq vs `cp -r`, in one run.

    python benchmarks/convert_speed.py [--work bench-work] [--repeats 3] [--llmc-python PATH] [--scheme nvfp4]

Generates (once, cached in --work) a ~1.7 GB bf16 Llama-shaped checkpoint: hidden 2048, intermediate
5632, 16 layers, 32 heads / 4 KV heads, vocab 32000, 4 shards, random weights. Then, as separate
whole processes (imports included), each repeated and reported as the median:

* `cp -r` of the checkpoint followed by `sync`;
* `python -m qconvert quantize CKPT --scheme rtn4` (W4A16, group 128; or --scheme nvfp4, mxfp4, mxfp8, fp8-block);
* llm-compressor 0.14 `model_free_ptq` with the same scheme (its preset) and ignore list (embeddings, lm_head),
  run in its own virtual environment (its pins conflict with ours; created on first use).

qconvert fsyncs its shards before renaming the output into place; model_free_ptq does not sync, so
its figure excludes writeback to disk while ours and cp's include it.

Peak RSS is measured per process with wait4(). It prints a Markdown table with the ratios against
llm-compressor measured in this same run, and checks that both tools wrote identical tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLMC_REQUIREMENTS = ["torch==2.13.0", "llmcompressor==0.14.0.1"]


def generate_checkpoint(folder: Path, layers: int = 16) -> Path:
    """A Llama-shaped random bf16 checkpoint in 4 shards (16 layers: 1.7 GB; 8 layers: 1.2 GB)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from safetensors.torch import save_file

    hidden, inter, heads, kv_heads, vocab = 2048, 5632, 32, 4, 32000
    head_dim = hidden // heads
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    per_shard = layers // 4
    weight_map = {}
    for shard_idx in range(4):
        tensors = {}
        if shard_idx == 0:
            tensors["model.embed_tokens.weight"] = w(vocab, hidden)
        for layer in range(shard_idx * per_shard, (shard_idx + 1) * per_shard):
            p = f"model.layers.{layer}"
            tensors[f"{p}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
            tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
            tensors[f"{p}.self_attn.q_proj.weight"] = w(hidden, hidden)
            tensors[f"{p}.self_attn.k_proj.weight"] = w(kv_heads * head_dim, hidden)
            tensors[f"{p}.self_attn.v_proj.weight"] = w(kv_heads * head_dim, hidden)
            tensors[f"{p}.self_attn.o_proj.weight"] = w(hidden, hidden)
            tensors[f"{p}.mlp.gate_proj.weight"] = w(inter, hidden)
            tensors[f"{p}.mlp.up_proj.weight"] = w(inter, hidden)
            tensors[f"{p}.mlp.down_proj.weight"] = w(hidden, inter)
        if shard_idx == 3:
            tensors["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
            tensors["lm_head.weight"] = w(vocab, hidden)
        name = f"model-{shard_idx + 1:05d}-of-00004.safetensors"
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    total = sum((tmp / n).stat().st_size for n in set(weight_map.values()))
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "tie_word_embeddings": False,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(folder)
    return folder


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one whole process."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{stderr[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def ensure_llmc_python(path: Path) -> Path:
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *LLMC_REQUIREMENTS], check=True)
    return python


def same_tensors(a: Path, b: Path) -> tuple[bool, int]:
    import torch
    from safetensors import safe_open

    def load_all(folder: Path) -> dict[str, tuple[Path, str]]:
        found = {}
        for shard in folder.glob("*.safetensors"):
            with safe_open(shard, "pt") as f:
                found.update({k: (shard, k) for k in f.keys()})
        return found

    left, right = load_all(a), load_all(b)
    if set(left) != set(right):
        return False, len(set(left) ^ set(right))
    for name in left:
        with safe_open(left[name][0], "pt") as fa, safe_open(right[name][0], "pt") as fb:
            ta, tb = fa.get_tensor(name), fb.get_tensor(name)
            if ta.dtype != tb.dtype or not torch.equal(ta, tb):
                return False, 1
    return True, len(left)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=REPO / "bench-work")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llmc-python", type=Path, default=None)
    parser.add_argument("--scheme", default="rtn4", choices=["rtn4", "fp8-block", "nvfp4", "mxfp4", "mxfp8"])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = generate_checkpoint(args.work / "llama-1.7b-shape")
    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    llmc = args.llmc_python or ensure_llmc_python(REPO / ".venv-llmc")

    outputs = {name: args.work / f"out-{name}" for name in ("cp", "qconvert", "llmc")}
    commands = {
        "cp": ["sh", "-c", f"cp -r '{ckpt}' '{outputs['cp']}' && sync"],
        "qconvert": [sys.executable, "-m", "qconvert", "quantize", str(ckpt), "--scheme", args.scheme,
                     "-o", str(outputs["qconvert"]), "--quiet"],
        "llmc": [str(llmc), str(REPO / "benchmarks" / "llmc_reference.py"), str(ckpt), str(outputs["llmc"]),
                 "--scheme", args.scheme, "--ignore", "lm_head", "--ignore", "model.embed_tokens"],
    }
    # Warm the page cache so every tool reads from memory, then alternate tools in each round.
    run_measured(["sh", "-c", f"cat '{ckpt}'/*.safetensors > /dev/null"])
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            shutil.rmtree(outputs[name], ignore_errors=True)
            # Untimed: start each tool with no dirty pages, so nobody pays for another tool's writes.
            subprocess.run(["sync"], check=True)
            results[name].append(run_measured(cmd))
    identical, count = same_tensors(outputs["qconvert"], outputs["llmc"])

    med = {name: statistics.median(s for s, _ in runs) for name, runs in results.items()}
    rss = {name: max(r for _, r in runs) for name, runs in results.items()}
    print(f"checkpoint: {size / 1e9:.2f} GB bf16, 4 shards; {platform.node()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, median of {args.repeats}")
    print()
    print("| tool | time (s) | peak RSS (MiB) | speed-up vs model_free_ptq |")
    print("| --- | --- | --- | --- |")
    print(f"| `cp -r` + sync | {med['cp']:.2f} | – | {med['llmc'] / med['cp']:.1f}x |")
    print(f"| llm-compressor model_free_ptq, whole process | {med['llmc']:.2f} | {rss['llmc']:.0f} | 1.0x |")
    print(f"| qconvert quantize --scheme {args.scheme}, whole process | {med['qconvert']:.2f} | {rss['qconvert']:.0f} "
          f"| {med['llmc'] / med['qconvert']:.2f}x |")
    print()
    print(f"outputs bit-identical to model_free_ptq: {'yes' if identical else 'NO'} ({count} tensors compared)")
    print(f"all runs (s, MiB): {json.dumps({k: [(round(s, 2), round(r)) for s, r in v] for k, v in results.items()})}")


if __name__ == "__main__":
    main()
