"""Whole-checkpoint conversion on a GPU machine: `cp -r` + sync, qconvert on the CPU and on CUDA, and
llm-compressor's `model_free_ptq` on CUDA with 8 workers, in one run (issue 13).

    python benchmarks/gpu_convert.py --work /path/on/fast/disk [--layers 16 64] [--repeats 3 1]
        [--schemes rtn4 fp8-block] [--deepseek] [--llmc-python python3] [--json results.json]

For each size (16 layers: 7.5 GB, 64 layers: 28.4 GB), generates once a Llama-8B-shaped bf16
checkpoint (hidden 4096, intermediate 14336, 32/8 heads, vocab 32000, ~2 GB shards; random weights),
warms the page cache, then runs each tool as a whole process (imports included), alternating tools in
each round, `sync` (untimed) and the previous output removed before each run; reports the median and
the peak RSS (wait4, the process and its children) of each. Checks that qconvert's CPU and CUDA
outputs are byte-identical (`cmp` of every file). `--deepseek` also converts a DeepSeek-style FP8 copy
of the first size (e4m3fn + fp32 128x128 `weight_scale_inv`) into int8-block on the CPU and on CUDA; `--mxfp4`
casts an MXFP4 copy of it (written by qconvert) to nvfp4 and fp8-block, the exact casts (issue 23).
`--mxfp4-layers N` instead writes an MXFP4 checkpoint of N Llama-8B-shaped layers directly (random codes, exponents
2**-11 .. 2**-7; ~116 MB a layer + 0.52 GB of bf16 embeddings: 236 layers make 28 GB), with no bf16 source,
so that a 28 GB-class input fits a 64 GiB disk: the disk then holds the source and one output (or the cp copy)
at a time; give `--layers` no value to time it alone. CPU and CUDA outputs are compared by digest (each output
removed once hashed), so two outputs never coexist.

The parent process never imports torch: a large parent would hand its resident pages to the peak RSS
of every child it starts. Generation runs in a child of its own.

Python bytecode: where ``PYTHONDONTWRITEBYTECODE`` is set and torch was installed without ``__pycache__``
(as on the lent GPU machines), every process compiles torch's Python modules again: 2-3 s of each
tool's start. ``--pycache DIR`` gives every tool's process a bytecode cache (``PYTHONPYCACHEPREFIX``),
filled by one untimed run of each tool first, as a pip install that compiles its modules would; the
report says which setting each table was measured with.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parent.parent
HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 8, 32000
SHARD_BYTES = 2 * 10**9


def write_sharded(tmp: Path, tensors: Iterator[tuple[str, Callable[[], torch.Tensor], int]]) -> None:
    """Write ``(name, make, nbytes)`` tensors into a fresh folder ``tmp`` as SHARD_BYTES shards and their index,
    making each tensor only when its shard is written (memory: one shard)."""
    from safetensors.torch import save_file

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[list[tuple[str, Callable[[], torch.Tensor]]]] = [[]]
    size = 0
    for name, make, nbytes in tensors:
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, make))
        size += nbytes
    weight_map = {}
    for index, specs in enumerate(shards):
        name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {t: make() for t, make in specs}
        save_file(data, tmp / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(data, name))
        del data
    total = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def generate(folder: Path, layers: int) -> None:
    """The bf16 checkpoint, written shard by shard (random normal * 0.02, made on the GPU if there is one)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(layers)
    head_dim = HIDDEN // HEADS

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()

    def tensors():
        yield "model.embed_tokens.weight", (VOCAB, HIDDEN)
        for layer in range(layers):
            p = f"model.layers.{layer}"
            yield f"{p}.input_layernorm.weight", (HIDDEN,)
            yield f"{p}.self_attn.q_proj.weight", (HIDDEN, HIDDEN)
            yield f"{p}.self_attn.k_proj.weight", (KV_HEADS * head_dim, HIDDEN)
            yield f"{p}.self_attn.v_proj.weight", (KV_HEADS * head_dim, HIDDEN)
            yield f"{p}.self_attn.o_proj.weight", (HIDDEN, HIDDEN)
            yield f"{p}.post_attention_layernorm.weight", (HIDDEN,)
            yield f"{p}.mlp.gate_proj.weight", (INTER, HIDDEN)
            yield f"{p}.mlp.up_proj.weight", (INTER, HIDDEN)
            yield f"{p}.mlp.down_proj.weight", (HIDDEN, INTER)
        yield "model.norm.weight", (HIDDEN,)
        yield "lm_head.weight", (VOCAB, HIDDEN)

    def made():
        for name, shape in tensors():
            make = (lambda n=shape[0]: torch.ones(n, dtype=torch.bfloat16)) if len(shape) == 1 else \
                (lambda shape=shape: w(*shape))
            yield name, make, 2 * int(torch.tensor(shape).prod())

    tmp = folder.with_name(folder.name + ".tmp")
    write_sharded(tmp, made())
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": False,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    os.sync()
    tmp.rename(folder)


def generate_deepseek(source: Path, folder: Path) -> None:
    """DeepSeek-V3-style FP8 of ``source``: each *_proj weight as e4m3fn + fp32 128x128 weight_scale_inv."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qconvert.quantizers import quantize_tiles, tile_scales

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    for shard in sorted(source.glob("*.safetensors")):
        data = {}
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if name.endswith("_proj.weight"):
                    wide = tensor.to(device).float()
                    scales = tile_scales(wide, (128, 128), 448.0)
                    data[name] = quantize_tiles(wide, scales, (128, 128), "float").cpu()
                    data[name.removesuffix(".weight") + ".weight_scale_inv"] = scales.cpu()
                else:
                    data[name] = tensor
        save_file(data, tmp / shard.name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(data, shard.name))
        del data
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    os.sync()
    tmp.rename(folder)


def mxfp4_config(layers: int) -> dict:
    """The config qconvert writes for ``-s mxfp4`` of the Llama-8B-shaped checkpoint (lm_head kept bf16)."""
    weights = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 32, "strategy": "group",
               "dynamic": False, "scale_dtype": "torch.uint8"}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": False,
        "quantization_config": {
            "quant_method": "compressed-tensors", "format": "mxfp4-pack-quantized",
            "quantization_status": "compressed", "ignore": ["lm_head"],
            "config_groups": {"MXFP4A16": {"targets": ["Linear"], "format": "mxfp4-pack-quantized",
                                           "weights": weights, "input_activations": None,
                                           "output_activations": None}}},
    }


def generate_mxfp4(folder: Path, layers: int) -> None:
    """An MXFP4 (compressed-tensors) checkpoint written directly, shard by shard: random packed codes and E8M0
    exponents 116..120 (what 0.02-scaled normal weights get), so both exact casts are lossless."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(layers)
    kv = KV_HEADS * (HIDDEN // HEADS)
    linears = (("self_attn.q_proj", HIDDEN, HIDDEN), ("self_attn.k_proj", kv, HIDDEN),
               ("self_attn.v_proj", kv, HIDDEN), ("self_attn.o_proj", HIDDEN, HIDDEN),
               ("mlp.gate_proj", INTER, HIDDEN), ("mlp.up_proj", INTER, HIDDEN), ("mlp.down_proj", HIDDEN, INTER))

    def tensors():  # (name, maker, bytes)
        def bf16(*shape: int):
            return lambda: (torch.randn(*shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()

        def ones(n: int):
            return lambda: torch.ones(n, dtype=torch.bfloat16)

        def codes(rows: int, columns: int, low: int = 0, high: int = 256):
            return lambda: torch.randint(low, high, (rows, columns), generator=gen, device=device,
                                         dtype=torch.uint8).cpu()

        yield "model.embed_tokens.weight", bf16(VOCAB, HIDDEN), 2 * VOCAB * HIDDEN
        for layer in range(layers):
            p = f"model.layers.{layer}"
            yield f"{p}.input_layernorm.weight", ones(HIDDEN), 2 * HIDDEN
            yield f"{p}.post_attention_layernorm.weight", ones(HIDDEN), 2 * HIDDEN
            for module, out, inp in linears:
                yield f"{p}.{module}.weight_packed", codes(out, inp // 2), out * inp // 2
                yield f"{p}.{module}.weight_scale", codes(out, inp // 32, 116, 121), out * inp // 32
        yield "model.norm.weight", ones(HIDDEN), 2 * HIDDEN
        yield "lm_head.weight", bf16(VOCAB, HIDDEN), 2 * VOCAB * HIDDEN

    tmp = folder.with_name(folder.name + ".tmp")
    write_sharded(tmp, tensors())
    (tmp / "config.json").write_text(json.dumps(mxfp4_config(layers), indent=2))
    os.sync()
    tmp.rename(folder)


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB of the process and its children) of one whole process."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{output[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def digests(folder: Path) -> dict[str, str]:
    """blake2b of each file of ``folder`` (an output is hashed, then removed, so that two never share the disk)."""
    import hashlib

    found = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest = hashlib.blake2b()
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
        found[path.name] = digest.hexdigest()
    return found


def used_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def bytecode_setting(pycache: Path | None) -> str:
    """How the tools' processes get Python bytecode (without importing torch here)."""
    spec = importlib.util.find_spec("torch")
    torch_dir = Path(spec.origin).parent if spec and spec.origin else None
    compiled = bool(torch_dir and (torch_dir / "__pycache__").is_dir())
    flag = os.environ.get("PYTHONDONTWRITEBYTECODE") or "unset"
    if pycache is not None:
        return f"bytecode cache {pycache} for every tool (PYTHONPYCACHEPREFIX), filled by one untimed run of each"
    return (f"as the machine is: PYTHONDONTWRITEBYTECODE={flag}, torch's own __pycache__ "
            f"{'present' if compiled else 'absent'}")


def measure(ckpt: Path, work: Path, schemes: list[str], repeats: int, llmc_python: str | None,
            with_cp: bool, workers: int | None, devices: list[str], env: dict | None = None,
            prime: bool = False) -> dict:
    qconvert = [sys.executable, "-m", "qconvert", "quantize", str(ckpt), "--quiet"]
    extra = ["--workers", str(workers)] if workers else []
    commands: dict[str, tuple[list[str], Path]] = {}
    if with_cp:
        commands["cp"] = (["sh", "-c", f"cp -r '{ckpt}' '{work / 'out-cp'}' && sync"], work / "out-cp")
    for scheme in schemes:
        name, _, algorithm = scheme.partition(":")  # "rtn4:search": the scheme with --algorithm search
        how = ["--algorithm", algorithm] if algorithm else []
        for device in devices:
            out = work / f"out-{scheme}-{device}"
            commands[f"qconvert {scheme} {device}"] = ([*qconvert, "-s", name, *how, "-o", str(out), "--device",
                                                         device, *extra], out)
        if llmc_python and not algorithm:
            out = work / f"out-{scheme}-llmc"
            commands[f"llmc {scheme} cuda"] = ([llmc_python, str(REPO / "benchmarks" / "llmc_reference.py"), str(ckpt),
                                                str(out), "--scheme", scheme, "--device", "cuda", "--workers", "8",
                                                "--ignore", "lm_head", "--ignore", "model.embed_tokens"], out)
    subprocess.run(["sh", "-c", f"cat '{ckpt}'/*.safetensors > /dev/null"], check=True)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    identical: dict[str, tuple[bool, int]] = {}
    hashed: dict[str, dict[str, str]] = {}
    disk_peak = 0
    if prime:
        for name, (cmd, out) in commands.items():
            if name != "cp":
                seconds, _ = run_measured(cmd, env)
                print(f"  untimed run filling the bytecode cache: {name}: {seconds:.2f} s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    for round_index in range(repeats):
        for name, (cmd, out) in commands.items():
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            runs[name].append(run_measured(cmd, env))
            disk_peak = max(disk_peak, used_bytes(work))  # the source(s) and this one output or copy
            print(f"  round {round_index + 1} {name}: {runs[name][-1][0]:.2f} s, {runs[name][-1][1]:.0f} MB",
                  flush=True)
            if round_index == repeats - 1 and name.startswith("qconvert"):
                hashed[name] = digests(out)  # untimed; compared below, so the outputs never coexist
            shutil.rmtree(out, ignore_errors=True)
    for scheme in {name.split()[1] for name in hashed}:
        cpu, cuda = hashed.get(f"qconvert {scheme} cpu"), hashed.get(f"qconvert {scheme} cuda")
        if cpu is not None and cuda is not None:
            identical[scheme] = (cpu == cuda, len(cpu))
            print(f"  {scheme}: CPU and CUDA outputs byte-identical: {identical[scheme]}", flush=True)
    print(f"  disk peak under {work}: {disk_peak / 1e9:.2f} GB", flush=True)
    return {"runs": runs, "identical": identical, "disk_peak_bytes": disk_peak}


def summarize(label: str, size: int, result: dict, stored: str = "bf16") -> list[str]:
    runs = result["runs"]
    timed = {name: [s for s, _ in values if s >= 0] for name, values in runs.items()}
    med = {name: statistics.median(v) for name, v in timed.items() if v}
    rss = {name: max(r for s, r in values if s >= 0) for name, values in runs.items() if timed[name]}
    lines = [f"### {label}: {size / 1e9:.2f} GB {stored}", "",
             "| run | median s | runs (s) | peak RSS (MB) | GB/s of input |", "| --- | --- | --- | --- | --- |"]
    for name in med:
        lines.append(f"| {name} | {med[name]:.2f} | {', '.join(f'{s:.2f}' for s in timed[name])} | "
                     f"{'–' if name == 'cp' else f'{rss[name]:.0f}'} | {size / 1e9 / med[name]:.2f} |")
    lines.append("")
    for scheme, (same, files) in result["identical"].items():
        lines.append(f"- {scheme}: CPU and CUDA outputs byte-identical: {'yes' if same else 'NO'} ({files} files)")
        gpu = med.get(f"qconvert {scheme} cuda")
        if gpu and f"llmc {scheme} cuda" in med:
            ratio = med[f"llmc {scheme} cuda"] / gpu
            lines.append(f"  - vs llm-compressor on CUDA: {ratio:.2f}x faster (target >= 3x)")
        if gpu and "cp" in med:
            lines.append(f"  - vs cp -r + sync: {gpu / med['cp']:.2f}x its time (target <= 1.3x)")
        cpu_time = med.get(f"qconvert {scheme} cpu")
        if cpu_time and "cp" in med:
            lines.append(f"  - CPU path vs cp -r + sync: {cpu_time / med['cp']:.2f}x its time")
        if gpu and f"qconvert {scheme} cpu" in med:
            lines.append(f"  - CUDA vs CPU path: {med[f'qconvert {scheme} cpu'] / gpu:.2f}x faster")
    return lines


# Output bytes per input byte of an MXFP4 linear layer (codes 1/2 + exponents 1/32 a weight): NVFP4 keeps the codes
# and doubles the scales (1/16 e4m3), fp8-block writes a byte a weight.
CAST_GROWTH = {"nvfp4": (1 / 2 + 1 / 16) / (1 / 2 + 1 / 32), "fp8-block": 1 / (1 / 2 + 1 / 32)}


def measure_mxfp4(args: argparse.Namespace, env: dict | None, report: dict) -> list[str]:
    """``--mxfp4-layers``: the exact casts of a directly written MXFP4 checkpoint, refused up front when the disk
    cannot hold the source and the largest output (or the cp copy) at once."""
    layers = args.mxfp4_layers
    ckpt = args.work / f"mxfp4-direct-{layers}l"
    for other in [*args.work.glob("mxfp4-direct-*"), *args.work.glob("llama8b-shape-*"), *args.work.glob("out-*")]:
        if other != ckpt:
            shutil.rmtree(other, ignore_errors=True)  # room for this size, its copy or one output
    weights = 2 * HIDDEN * HIDDEN + 2 * KV_HEADS * (HIDDEN // HEADS) * HIDDEN + 3 * INTER * HIDDEN  # a layer's
    per_layer = weights * (1 / 2 + 1 / 32)  # MXFP4 bytes
    embeddings = 4 * VOCAB * HIDDEN  # embed_tokens and lm_head in bf16
    growth = max([1.0] + [CAST_GROWTH.get(scheme, 2.0) for scheme in args.mxfp4_schemes])
    source, largest = int(layers * per_layer) + embeddings, int(layers * per_layer * growth) + embeddings
    free = shutil.disk_usage(args.work).free + (folder_bytes(ckpt) if ckpt.is_dir() else 0)
    if source + largest > free * 0.97:
        fits = int((free * 0.97 - 2 * embeddings) / (per_layer * (1 + growth)))
        raise SystemExit(f"--mxfp4-layers {layers}: the source ({source / 1e9:.1f} GB) and the largest output "
                         f"({largest / 1e9:.1f} GB) need {(source + largest) / 1e9:.1f} GB; {args.work} has "
                         f"{free / 1e9:.1f} GB free: at most {fits} layers for {' and '.join(args.mxfp4_schemes)}")
    print(f"MXFP4 {layers} layers: source {source / 1e9:.1f} GB, largest output {largest / 1e9:.1f} GB, "
          f"expected disk peak {(source + largest) / 1e9:.1f} GB of {free / 1e9:.1f} GB free", flush=True)
    if not (ckpt / "config.json").is_file():
        started = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--generate-mxfp4", str(ckpt), str(layers)], check=True)
        print(f"generated {ckpt} in {time.perf_counter() - started:.1f} s", flush=True)
    size = folder_bytes(ckpt)
    result = measure(ckpt, args.work, args.mxfp4_schemes, args.mxfp4_repeats, None, not args.no_cp, args.workers,
                     args.mxfp4_devices or args.devices, env, prime=args.pycache is not None)
    report["sizes"][f"{layers}l-mxfp4-direct"] = {"bytes": size, "repeats": args.mxfp4_repeats, **result}
    lines = summarize(f"MXFP4 of {layers} layers, written directly → exact casts ({args.mxfp4_repeats} repeat(s))",
                      size, result, "MXFP4")
    return [*lines, f"- disk peak: {result['disk_peak_bytes'] / 1e9:.2f} GB", ""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=REPO / "bench-work")
    parser.add_argument("--layers", type=int, nargs="*", default=[16, 64], help="bf16 sizes; none: skip them")
    parser.add_argument("--repeats", type=int, nargs="+", default=[3, 1], help="per size, in --layers order")
    parser.add_argument("--schemes", nargs="+", default=["rtn4", "fp8-block"],
                        help="schemes to time; SCHEME:ALGORITHM (rtn4:search) adds --algorithm")
    parser.add_argument("--llmc-python", default=sys.executable, help="'' to skip llm-compressor")
    parser.add_argument("--no-cp", action="store_true")
    parser.add_argument("--deepseek", action="store_true")
    parser.add_argument("--deepseek-repeats", type=int, default=1)
    parser.add_argument("--mxfp4", action="store_true",
                        help="also cast an MXFP4 copy of the first size to nvfp4 and fp8-block (exact casts)")
    parser.add_argument("--mxfp4-repeats", type=int, default=3)
    parser.add_argument("--mxfp4-layers", type=int, default=None,
                        help="write an MXFP4 checkpoint of this many layers directly (236: 28 GB) and cast it")
    parser.add_argument("--mxfp4-schemes", nargs="+", default=["nvfp4", "fp8-block"],
                        help="the casts --mxfp4-layers times (fp8-block writes ~1.9x the input)")
    parser.add_argument("--mxfp4-devices", nargs="+", default=None,
                        help="qconvert --device values for --mxfp4-layers (default: --devices)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="qconvert --device values to time")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--pycache", type=Path, default=None,
                        help="a bytecode cache for every tool's process, filled by one untimed run of each")
    parser.add_argument("--generate", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--generate-deepseek", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--generate-mxfp4", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(Path(args.generate[0]), int(args.generate[1]))
        return
    if args.generate_mxfp4:
        generate_mxfp4(Path(args.generate_mxfp4[0]), int(args.generate_mxfp4[1]))
        return
    if args.generate_deepseek:
        generate_deepseek(Path(args.generate_deepseek[0]), Path(args.generate_deepseek[1]))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    env = None
    if args.pycache:
        env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(args.pycache.resolve())
    bytecode = bytecode_setting(args.pycache)
    report: dict = {"machine": f"{platform.node()}, {os.cpu_count()} cores", "bytecode": bytecode, "sizes": {}}
    lines: list[str] = [f"Python bytecode: {bytecode}.", ""]
    for index, layers in enumerate(args.layers):
        repeats = args.repeats[min(index, len(args.repeats) - 1)]
        ckpt = args.work / f"llama8b-shape-{layers}l"
        for other in args.work.glob("llama8b-shape-*"):
            if other != ckpt and not (args.deepseek and index == 0):
                shutil.rmtree(other, ignore_errors=True)  # room on the disk for this size and its copy
        if not (ckpt / "config.json").is_file():
            started = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--generate", str(ckpt), str(layers)], check=True)
            print(f"generated {ckpt} in {time.perf_counter() - started:.1f} s", flush=True)
        size = folder_bytes(ckpt)
        print(f"{layers} layers, {size / 1e9:.2f} GB, {repeats} repeat(s)", flush=True)
        result = measure(ckpt, args.work, args.schemes, repeats, args.llmc_python or None, not args.no_cp,
                         args.workers, args.devices, env, prime=args.pycache is not None)
        report["sizes"][f"{layers}l"] = {"bytes": size, "repeats": repeats, **result}
        lines += summarize(f"{layers} layers ({repeats} repeat(s))", size, result)
        lines.append("")
        if args.json:
            args.json.write_text(json.dumps({**report, "table": lines}, indent=2))
        print("\n".join(lines), flush=True)
        if args.deepseek and index == 0:
            fp8 = args.work / f"llama8b-shape-{layers}l-deepseek-fp8"
            if not (fp8 / "config.json").is_file():
                subprocess.run([sys.executable, __file__, "--generate-deepseek", str(ckpt), str(fp8)], check=True)
            fp8_size = folder_bytes(fp8)
            result = measure(fp8, args.work, ["int8-block"], args.deepseek_repeats, None, not args.no_cp,
                             args.workers, args.devices, env, prime=args.pycache is not None)
            report["sizes"][f"{layers}l-deepseek"] = {"bytes": fp8_size, "repeats": args.deepseek_repeats, **result}
            label = f"DeepSeek-style FP8 of {layers} layers → int8-block ({args.deepseek_repeats} repeat(s))"
            lines += summarize(label,
                               fp8_size, result)
            lines.append("")
            shutil.rmtree(fp8, ignore_errors=True)
        if args.mxfp4 and index == 0:
            # The exact casts of issue 23: an MXFP4 checkpoint (written by qconvert itself from the bf16 one) cast
            # to NVFP4 and to fp8 blocks, codes kept; the target is the time of a plain copy.
            mx = args.work / f"llama8b-shape-{layers}l-mxfp4"
            if not (mx / "config.json").is_file():
                device = "cuda" if "cuda" in args.devices else "cpu"
                subprocess.run([sys.executable, "-m", "qconvert", "quantize", str(ckpt), "-s", "mxfp4", "-o", str(mx),
                                "--device", device, "--quiet"], check=True)
            mx_size = folder_bytes(mx)
            result = measure(mx, args.work, ["nvfp4", "fp8-block"], args.mxfp4_repeats, None, not args.no_cp,
                             args.workers, args.devices, env, prime=args.pycache is not None)
            report["sizes"][f"{layers}l-mxfp4"] = {"bytes": mx_size, "repeats": args.mxfp4_repeats, **result}
            lines += summarize(f"MXFP4 of {layers} layers → exact casts ({args.mxfp4_repeats} repeat(s))", mx_size,
                               result, "MXFP4")
            lines.append("")
            shutil.rmtree(mx, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    if args.mxfp4_layers:
        lines += measure_mxfp4(args, env, report)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    print()
    print(f"machine: {report['machine']}")
    print("\n".join(lines))
    if args.json:
        report["table"] = lines
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
