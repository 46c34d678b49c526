"""``qconvert quantize`` end to end: real checkpoints in, real libraries loading what comes out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qconvert.quantizers import dequantize_tiles, unpack_int32
from tests.conftest import build_linear_shards, build_tiny_llama, read_config, read_tensors, run_cli, tree_digest


def _our_dequantized(tensors: dict[str, torch.Tensor], module: str, bits: int) -> torch.Tensor:
    packed, scale = tensors[f"{module}.weight_packed"], tensors[f"{module}.weight_scale"]
    _, in_features = tensors[f"{module}.weight_shape"].tolist()
    tile = (1, in_features // scale.shape[1])  # per channel: one group spanning the row
    return dequantize_tiles(unpack_int32(packed, bits, in_features), scale, tile)


def _load_with_compressed_tensors(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=CompressedTensorsConfig(dequantize=True))


@pytest.mark.parametrize(("scheme", "bits"), [("rtn4", 4), ("rtn8", 8)])
def test_tiny_llama_loads_in_transformers_with_our_exact_weights(
    tiny_llama: Path, tmp_path: Path, scheme: str, bits: int
) -> None:
    from transformers import AutoModelForCausalLM

    before = tree_digest(tiny_llama)
    out = tmp_path / "out"
    result = run_cli("quantize", tiny_llama, "--scheme", scheme, "-o", out, "--max-shard-size", "300KB", "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert tree_digest(tiny_llama) == before, "the input was modified"

    # Layout: several shards, an index that names every tensor, every other file copied.
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards == summary["shards"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = read_tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert (out / "extra" / "notes.txt").read_text() == (tiny_llama / "extra" / "notes.txt").read_text()
    assert (out / "generation_config.json").is_file()
    assert not list(tmp_path.glob(".*partial*"))

    qconfig = read_config(out)["quantization_config"]
    assert qconfig["format"] == "pack-quantized" and qconfig["ignore"] == ["lm_head"]
    assert next(iter(qconfig["config_groups"].values()))["weights"]["num_bits"] == bits
    assert summary["quantized_layers"] == 14  # 2 layers x (q, k, v, o, gate, up, down)

    # Tensors that are not quantized pass through bit-identical.
    original = read_tensors(tiny_llama)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.1.input_layernorm.weight"):
        assert tensors[name].dtype == original[name].dtype and torch.equal(tensors[name], original[name])

    # compressed-tensors (through transformers) rebuilds exactly the weights we rebuild.
    model = _load_with_compressed_tensors(out)
    for layer in summary["layers"]:
        module = layer["module"]
        theirs = model.get_submodule(module).weight.detach()
        ours = _our_dequantized(tensors, module, bits)
        assert theirs.dtype == ours.dtype == torch.bfloat16
        assert torch.equal(theirs, ours), module

    reference = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits.float()
        got = model(ids).logits.float()
    relative = ((got - expected).norm() / expected.norm()).item()
    assert torch.isfinite(got).all()
    if scheme == "rtn8":
        assert relative < 0.02, relative


def test_group_size_per_channel_and_skipped_layers(tiny_llama: Path, tmp_path: Path) -> None:
    # Group 256: down_proj has 384 inputs, not a multiple, so it stays unquantized and is ignored.
    result = run_cli("quantize", tiny_llama, "-o", tmp_path / "g256", "--group-size", "256", "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    skipped = {s["module"]: s["reason"] for s in summary["skipped"]}
    assert "not a multiple of the group size 256" in skipped["model.layers.0.mlp.down_proj"]
    assert "model.layers.0.mlp.down_proj" in read_config(tmp_path / "g256")["quantization_config"]["ignore"]
    # Run without --json, the user is told which layer was left alone and why.
    again = run_cli("quantize", tiny_llama, "-o", tmp_path / "g256b", "--group-size", "256")
    assert "model.layers.0.mlp.down_proj" in again.stderr and "not a multiple" in again.stderr
    model = _load_with_compressed_tensors(tmp_path / "g256")
    original = read_tensors(tiny_llama)
    down = model.get_submodule("model.layers.0.mlp.down_proj").weight.detach()
    assert torch.equal(down, original["model.layers.0.mlp.down_proj.weight"])

    # Per channel: one scale per output row, loadable and exact.
    result = run_cli("quantize", tiny_llama, "-o", tmp_path / "chan", "-s", "rtn8", "--group-size", "-1", "--json")
    assert result.code == 0, result.stderr
    weights = next(iter(read_config(tmp_path / "chan")["quantization_config"]["config_groups"].values()))["weights"]
    assert weights["strategy"] == "channel" and weights["group_size"] is None
    tensors = read_tensors(tmp_path / "chan")
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (256, 1)
    model = _load_with_compressed_tensors(tmp_path / "chan")
    module = "model.layers.1.mlp.down_proj"
    assert torch.equal(model.get_submodule(module).weight.detach(), _our_dequantized(tensors, module, 8))


def test_ignore_and_targets(tiny_llama: Path, tmp_path: Path) -> None:
    result = run_cli("quantize", tiny_llama, "-o", tmp_path / "ign", "--ignore", "re:.*self_attn.*",
                     "--ignore", "model.layers.1.mlp.down_proj", "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    quantized = {layer["module"] for layer in summary["layers"]}
    assert not any("self_attn" in m for m in quantized) and "model.layers.1.mlp.down_proj" not in quantized
    assert len(quantized) == 5
    ignore = read_config(tmp_path / "ign")["quantization_config"]["ignore"]
    assert "model.layers.0.self_attn.q_proj" in ignore and "model.layers.1.mlp.down_proj" in ignore
    assert "model.layers.0.self_attn.qkv_proj" in ignore  # the fused name engines match
    _load_with_compressed_tensors(tmp_path / "ign")  # loads: every unquantized Linear is ignored

    pattern = r"re:.*mlp\.(gate|up)_proj$"
    result = run_cli("quantize", tiny_llama, "-o", tmp_path / "tgt", "--targets", pattern, "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert sorted(layer["module"] for layer in summary["layers"]) == [
        f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up")
    ]
    model = _load_with_compressed_tensors(tmp_path / "tgt")
    original = read_tensors(tiny_llama)
    assert torch.equal(model.get_submodule("model.layers.0.mlp.down_proj").weight.detach(),
                       original["model.layers.0.mlp.down_proj.weight"])


def test_hub_id_resolves_offline_from_the_local_cache(tiny_llama: Path, tmp_path: Path) -> None:
    # The cache layout huggingface_hub itself writes: refs/main names a snapshot folder of files.
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in tiny_llama.rglob("*"):
        if path.is_file():
            target = snapshot / path.relative_to(tiny_llama)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    # A process of its own: huggingface_hub reads these variables once, at import.
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli("quantize", "acme/tiny-llama", "--scheme", "rtn8", "--json", cwd=work, env=env,
                     process=True)
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["output"] == str(work / "tiny-llama-rtn8")
    assert (work / "tiny-llama-rtn8" / "config.json").is_file()
    assert (work / "tiny-llama-rtn8" / "extra" / "notes.txt").is_file()

    missing = run_cli("quantize", "acme/not-cached", cwd=work, env=env, process=True)
    assert missing.code == 2 and len(missing.stderr_lines) == 1
    assert "acme/not-cached" in missing.stderr and "cache" in missing.stderr


def test_output_location_rules(tiny_llama_copy: Path, tmp_path: Path) -> None:
    model = tiny_llama_copy
    inside = run_cli("quantize", model, "-o", model / "q")
    assert inside.code == 2 and "inside" in inside.stderr and not (model / "q").exists()
    same = run_cli("quantize", model, "-o", model)
    assert same.code == 2
    parent = run_cli("quantize", model, "-o", model.parent, "--overwrite")
    assert parent.code == 2 and model.is_dir()

    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    busy = run_cli("quantize", model, "-o", out)
    assert busy.code == 2 and "--overwrite" in busy.stderr and (out / "keep.txt").read_text() == "precious"
    replaced = run_cli("quantize", model, "-o", out, "--overwrite", "-q")
    assert replaced.code == 0, replaced.stderr
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    default = run_cli("quantize", model, "-q")
    assert default.code == 0 and (model.parent / "model-rtn4" / "config.json").is_file()


@pytest.mark.slow  # make test has the same (SIGTERM mid-run) in test_process.py::test_signal_mid_run_leaves_nothing
def test_interrupted_run_leaves_nothing(tmp_path: Path) -> None:
    # Big enough (about 130 MB) that the run is still going when the signal arrives.
    model = build_linear_shards(tmp_path / "big", 2048)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "qconvert", "quantize", str(model), "-o", str(out)],
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.qconvert-*.partial")):
        assert proc.poll() is None, "finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not out.exists()
    assert list(tmp_path.glob(".out*")) == []


def test_schemes_and_version(tmp_path: Path) -> None:
    result = run_cli("schemes", "--json")
    assert result.code == 0
    rows = {row["name"]: row for row in json.loads(result.stdout)["schemes"]}
    assert rows["rtn4"]["bits"] == 4 and rows["rtn8"]["group_size"] == 128
    table = run_cli("schemes")
    assert "pack-quantized" in table.stdout
    assert run_cli("--version", process=True).stdout.startswith("qconvert ")


def test_quantize_builds_its_own_sharded_fixture(tmp_path: Path) -> None:
    # The fixture builder gives a checkpoint that needs the index; a single-file output has none.
    model = build_tiny_llama(tmp_path / "m", max_shard_size="100KB", seed=1)
    assert len(list(model.glob("*.safetensors"))) > 3
    result = run_cli("quantize", model, "-o", tmp_path / "single", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["shards"] == ["model.safetensors"]
    assert not (tmp_path / "single" / "model.safetensors.index.json").exists()
