"""NVFP4 and MXFP4: bit-identical to llm-compressor 0.14's NVFP4A16 / MXFP4A16 where it is right, and right where
it is wrong (each defect shown on llm-compressor's own output, and its absence on ours).

The defects (found by reading llm-compressor 0.14's model_free_ptq and running it):
* it shares NVFP4's global scale only for q/k/v and dense gate/up (its own name patterns): MoE experts' and shared
  experts' gate/up, and DeepSeek's q_a_proj + kv_a_proj_with_mqa under their HF names, get separate global
  scales, though vLLM and SGLang load each pair as one fused matrix with one global scale;
* it computes the global scale ``2688 / amax`` in the weight's dtype: for fp16 weights with amax < 0.041 that
  overflows and silently falls back to 1.0, and every block scale of the layer underflows e4m3;
* it refuses a checkpoint where a shard holds some of a fused layer's parts but not its first (k/v without q:
  "Could not find inverse_weight_map for shard ...").
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from qconvert.formats.microscaled import NVFP4
from qconvert.microscaling import nvfp4_global_scale
from tests.arch_matrix import CASES
from tests.conftest import (
    DEVICE,
    assert_same_as_llm_compressor,
    build_tiny_llama,
    read_config,
    read_tensors,
    run_llm_compressor,
)
from tests.test_architectures import build_checkpoint
from tests.test_serving import run_inline

PRESETS = {"nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16", "mxfp8": "MXFP8A16"}
ARCH = {case.name: case for case in CASES}


@pytest.fixture(scope="module")
def one_shard_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One shard: llm-compressor refuses NVFP4 on a checkpoint whose q and k/v lie in different shards.
    return build_tiny_llama(tmp_path_factory.mktemp("llama1") / "m", max_shard_size="1GB")


def test_bit_identical_to_llm_compressor(one_shard_llama: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A user's two-line check: `qconvert quantize M -s nvfp4` and llm-compressor's NVFP4A16 (and MXFP4A16) give
    the same config field for field and the same bytes in every tensor of every layer we quantize."""
    run_llm_compressor(one_shard_llama, {preset: tmp_path / f"llmc-{s}" for s, preset in PRESETS.items()})
    for scheme in PRESETS:
        assert run_inline(capsys, "quantize", one_shard_llama, "-s", scheme, "-o", tmp_path / scheme, "-q")[0] == 0
        assert_same_as_llm_compressor(tmp_path / scheme, tmp_path / f"llmc-{scheme}", scheme)


def _global_scales(folder: Path) -> dict[str, float]:
    return {name.removesuffix(".weight_global_scale"): float(t) for name, t in read_tensors(folder).items()
            if name.endswith(".weight_global_scale")}


def _unshared_pairs(folder: Path, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The fused pairs (module, module) whose stored global scales differ."""
    scales = _global_scales(folder)
    return [(a, b) for a, b in pairs if scales[a] != scales[b]]


def _fused_pairs(folder: Path) -> list[tuple[str, str]]:
    """Every gate/up pair (dense, per expert, shared experts) and DeepSeek's q_a/kv_a pair in ``folder``."""
    modules = set(_global_scales(folder))
    pairs = [(m, m.replace("gate_proj", "up_proj")) for m in modules if m.endswith("gate_proj")]
    pairs += [(m, m.replace("q_a_proj", "kv_a_proj_with_mqa")) for m in modules if m.endswith("q_a_proj")]
    return sorted(pairs)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_every_engine_fusion_shares_one_global_scale(arch: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """vLLM's NVFP4 MoE method loads w13 (gate, up) with one global scale (gate's): a separate up scale is
    dequantized with the wrong multiplier. Ours are shared by every fusion of the fusion map, each equal to
    the global scale of the fused matrix; llm-compressor's are not."""
    source = build_checkpoint(ARCH[arch], tmp_path)
    assert run_inline(capsys, "quantize", source, "-s", "nvfp4", "-o", tmp_path / "ours", "-q")[0] == 0
    pairs = _fused_pairs(tmp_path / "ours")
    experts = [p for p in pairs if ".experts." in p[0]]
    assert experts and (arch != "deepseek_v3" or any("q_a_proj" in a for a, _ in pairs)), pairs
    assert _unshared_pairs(tmp_path / "ours", pairs) == []
    weights = read_tensors(source)
    scales = _global_scales(tmp_path / "ours")
    for a, b in pairs:
        amax = torch.stack([weights[f"{a}.weight"].abs().amax(), weights[f"{b}.weight"].abs().amax()]).max()
        assert scales[a] == float(nvfp4_global_scale(amax, torch.bfloat16))
    run_llm_compressor(source, {"NVFP4A16": tmp_path / "llmc"})
    theirs = _unshared_pairs(tmp_path / "llmc", pairs)
    assert any(".experts." in a for a, _ in theirs), "llm-compressor now shares experts' global scales"
    if arch == "deepseek_v3":
        assert any("q_a_proj" in a for a, _ in theirs)


def _fp16_small_llama(folder: Path) -> Path:
    """A tiny fp16 Llama whose weights all have amax 0.01 < 0.041 (2688 / amax overflows fp16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.float16)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(param / param.abs().amax() * 0.01)
    model.save_pretrained(folder, max_shard_size="1GB")
    return folder


def _weight_error(folder: Path, source: dict[str, torch.Tensor], module: str) -> float:
    tensors = {name.rpartition(".")[2]: t for name, t in read_tensors(folder).items()
               if name.rpartition(".")[0] == module}
    from qconvert.microscaling import e2m1_values, unpack_nibbles

    codes = e2m1_values(unpack_nibbles(tensors["weight_packed"]))
    multipliers = NVFP4.instance().decoded_scales(tensors).repeat_interleave(16, dim=1)
    original = source[f"{module}.weight"].to(torch.float32)
    return float((codes * multipliers - original).norm() / original.norm())


def test_fp16_global_scale_is_computed_in_float32(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """For fp16 weights with amax < 0.041, llm-compressor's global scale overflows fp16 and silently becomes 1.0
    (then block scales underflow e4m3: a large weight error); ours is 2688 / amax in float32, and the weight keeps
    NVFP4's usual error."""
    source = _fp16_small_llama(tmp_path / "m")
    assert run_inline(capsys, "quantize", source, "-s", "nvfp4", "-o", tmp_path / "ours", "-q")[0] == 0
    run_llm_compressor(source, {"NVFP4A16": tmp_path / "llmc"})
    weights = read_tensors(source)
    module = "model.layers.0.self_attn.o_proj"
    ours, theirs = _global_scales(tmp_path / "ours")[module], _global_scales(tmp_path / "llmc")[module]
    amax = weights[f"{module}.weight"].abs().amax().to(torch.float32)
    assert ours == pytest.approx(float(2688 / amax), rel=1e-6) and ours > 65504
    assert theirs == 1.0
    assert _weight_error(tmp_path / "ours", weights, module) < 0.15
    assert _weight_error(tmp_path / "llmc", weights, module) > 0.2


def test_q_and_kv_in_different_shards(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """llm-compressor refuses NVFP4 when a shard holds k/v_proj without their q_proj; we read each part once for the
    shared amax, wherever it lies, and write what a one-shard copy of the same model gives."""
    weight_map = json.loads((tiny_llama / "model.safetensors.index.json").read_text())["weight_map"]
    qkv = ("q_proj", "k_proj", "v_proj")
    split = [layer for layer in (0, 1)
             if len({weight_map[f"model.layers.{layer}.self_attn.{p}.weight"] for p in qkv}) > 1]
    assert split, "the fixture no longer splits q/k/v across shards"
    proc = run_llm_compressor(tiny_llama, {"NVFP4A16": tmp_path / "llmc"}, expect_failure=True)
    assert proc.returncode != 0 and "inverse_weight_map" in proc.stderr, proc.stderr[-1000:]
    assert run_inline(capsys, "quantize", tiny_llama, "-s", "nvfp4", "-o", tmp_path / "ours", "-q")[0] == 0
    one_shard = build_tiny_llama(tmp_path / "one", max_shard_size="1GB")
    assert run_inline(capsys, "quantize", one_shard, "-s", "nvfp4", "-o", tmp_path / "ref", "-q")[0] == 0
    ours, ref = read_tensors(tmp_path / "ours"), read_tensors(tmp_path / "ref")
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[n].view(torch.uint8), ref[n].view(torch.uint8)) for n in ours)
    scales = _global_scales(tmp_path / "ours")
    assert len({scales[f"model.layers.{split[0]}.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj")}) == 1


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_routers_stay_unquantized(scheme: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = build_checkpoint(ARCH["qwen3_moe"], tmp_path)
    assert run_inline(capsys, "quantize", source, "-s", scheme, "-o", tmp_path / "o", "-q")[0] == 0
    tensors = read_tensors(tmp_path / "o")
    assert tensors["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
    assert "model.layers.0.mlp.gate.weight_packed" not in tensors
    assert "model.layers.0.mlp.gate" in read_config(tmp_path / "o")["quantization_config"]["ignore"]


def _corrupt(folder: Path, name: str, change: Callable[[torch.Tensor], None]) -> None:
    from safetensors.torch import load_file, save_file

    shard = folder / "model.safetensors"
    tensors = load_file(shard)
    change(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})


def _flip_nibble(t: torch.Tensor) -> None:
    t[3, 5] ^= 0x03  # a code two or three grid steps away


def _flip_code(t: torch.Tensor) -> None:
    t.view(torch.uint8)[3, 5] ^= 0x20  # an e4m3 exponent bit: four times or a quarter of the value


def _smaller_scale(t: torch.Tensor) -> None:
    if t.dtype == torch.uint8:
        t[2, 1] -= 2  # E8M0: a quarter of the scale
    else:
        t[2, 1] = (t[2, 1].to(torch.float32) / 4).to(t.dtype)  # stays finite (x4 could pass e4m3's 448)


def _nan_scale(t: torch.Tensor) -> None:
    t.view(torch.uint8)[2, 1] = 0x7F if t.dtype == torch.float8_e4m3fn else 0xFF  # e4m3's NaN, E8M0's NaN


def _smaller_global_scale(t: torch.Tensor) -> None:
    t.mul_(0.5)  # every block's multiplier doubles


@pytest.mark.parametrize(("scheme", "leaf", "change"), [
    ("nvfp4", "weight_packed", _flip_nibble), ("nvfp4", "weight_scale", _smaller_scale),
    ("nvfp4", "weight_scale", _nan_scale), ("mxfp4", "weight_scale", _nan_scale),
    ("nvfp4", "weight_global_scale", _smaller_global_scale),
    ("mxfp4", "weight_packed", _flip_nibble), ("mxfp4", "weight_scale", _smaller_scale),
    ("mxfp8", "weight", _flip_code), ("mxfp8", "weight_scale", _smaller_scale),
])
def test_verify_passes_sound_layers_and_catches_corruption(scheme: str, leaf: str, change: Callable,
                                                           one_shard_llama: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`verify --original` runs the microscaled Triton GEMM (CPU interpreter here, GPU on the device tier) against
    the dequantized operands, and checks each weight element against round-to-nearest's bound: a sound layer
    passes; one corrupted nibble, block scale or global scale fails the weight check."""
    from qconvert.verification import verify

    out = tmp_path / scheme
    assert run_inline(capsys, "quantize", one_shard_llama, "-s", scheme, "-o", out, "-q")[0] == 0
    module = "model.layers.0.self_attn.v_proj"
    sound = verify(str(out), original=str(one_shard_llama), device=DEVICE, tokens=[3], layers=module)
    assert sound.ok and sound.layers[0].kernel_ok and sound.layers[0].weight_ok, sound.to_json()
    _corrupt(out, f"{module}.{leaf}", change)
    bad = verify(str(out), original=str(one_shard_llama), device=DEVICE, tokens=[3], layers=module)
    assert not bad.ok and not bad.layers[0].weight_ok and bad.layers[0].weight_violations >= 1
    # A finite corruption: the kernel still computes what the stored operands say; a NaN one fails it too.
    assert bad.layers[0].kernel_ok == (change is not _nan_scale)


@pytest.fixture(scope="module")
def written(one_shard_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from qconvert.cli import main

    root = tmp_path_factory.mktemp("written")
    for scheme in PRESETS:
        with pytest.raises(SystemExit) as done:
            main(["quantize", str(one_shard_llama), "-s", scheme, "-o", str(root / scheme), "-q"])
        assert done.value.code == 0
    return {scheme: root / scheme for scheme in PRESETS}


def test_dequantize_is_compressed_tensors_decompression(written: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`convert --op dequantize` writes, for every layer, the weight compressed-tensors' own decompressor rebuilds."""
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.mxfp8.base import MXFP8QuantizationCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    compressors = {"nvfp4": NVFP4PackedCompressor, "mxfp4": MXFP4PackedCompressor,
                   "mxfp8": MXFP8QuantizationCompressor}
    for scheme, folder in written.items():
        out = tmp_path / scheme
        assert run_inline(capsys, "convert", folder, "--op", "dequantize", "-o", out, "-q")[0] == 0
        stored, plain = read_tensors(folder), read_tensors(out)
        modules = {name.rpartition(".")[0] for name in stored if name.endswith(".weight_scale")}
        assert len(modules) == 14
        preset = preset_name_to_scheme(PRESETS[scheme], ["Linear"])
        for module in modules:
            leaves = {name.rpartition(".")[2]: t for name, t in stored.items() if name.rpartition(".")[0] == module}
            reference = compressors[scheme].decompress(leaves, preset)["weight"]
            ours = plain[f"{module}.weight"]
            assert ours.dtype == torch.bfloat16 and torch.equal(ours, reference.to(torch.bfloat16)), (scheme, module)


def test_inspect_names_each_format(written: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    bits = {"nvfp4": 4 + 8 / 16, "mxfp4": 4 + 8 / 32, "mxfp8": 8 + 8 / 32}
    for scheme, folder in written.items():
        code, out, err = run_inline(capsys, "inspect", folder, "--json")
        assert code == 0, err
        report = json.loads(out)
        layer = next(x for x in report["layers"] if x["module"] == "model.layers.0.self_attn.q_proj")
        fmt = read_config(folder)["quantization_config"]["format"]
        assert layer["format"] == fmt and report["format"] == f"compressed-tensors {fmt}"
        assert layer["scheme"] == {"nvfp4": "fp4 g16", "mxfp4": "fp4 g32", "mxfp8": "fp8 g32"}[scheme]
        assert abs(report["totals"]["bits_per_weight"] - bits[scheme]) < 0.01, report["totals"]


def test_quantized_input_is_copied_or_requantized_only_when_allowed(written: dict[str, Path], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """An FP4 checkpoint as input: the same scheme copies every byte; an int scheme needs --allow-requantize
    (one line naming the layer otherwise); MXFP8 (fp8 codes) is requantized like fp8 inputs are."""
    code, _, err = run_inline(capsys, "quantize", written["nvfp4"], "-s", "nvfp4", "-o", tmp_path / "same", "-q")
    assert code == 0, err
    again, before = read_tensors(tmp_path / "same"), read_tensors(written["nvfp4"])
    assert again.keys() == before.keys() and all(torch.equal(again[n].view(torch.uint8), before[n].view(torch.uint8))
                                                  for n in again)
    # (MXFP4 → nvfp4 / fp8-block are exact casts, tests/test_released.py; into int codes it is a requantization)
    code, _, err = run_inline(capsys, "quantize", written["mxfp4"], "-s", "rtn8", "-o", tmp_path / "r")
    assert code == 2 and "--allow-requantize" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_inline(capsys, "quantize", written["mxfp4"], "-s", "rtn8", "-o", tmp_path / "r", "-q",
                              "--allow-requantize")
    assert code == 0, err
    code, _, err = run_inline(capsys, "quantize", written["mxfp8"], "-s", "rtn4", "-o", tmp_path / "m", "-q")
    assert code == 0, err


def test_batch_writes_what_quantize_writes(written: dict[str, Path], one_shard_llama: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(f"jobs:\n  - model: {one_shard_llama}\n    schemes: [nvfp4, mxfp4, mxfp8]\n"
                    f"    output: {tmp_path}/b-{{scheme}}\n")
    code, _, err = run_inline(capsys, "batch", jobs, "--quiet")
    assert code == 0, err
    for scheme, folder in written.items():
        ours, theirs = read_tensors(tmp_path / f"b-{scheme}"), read_tensors(folder)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[n].view(torch.uint8), theirs[n].view(torch.uint8)) for n in ours), scheme


def test_inputs_that_are_not_whole_groups_stay_unquantized_with_a_reason(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """down_proj's 48 inputs are 3 groups of 16 (NVFP4 quantizes it) but not whole groups of 32 (MX leaves it
    unquantized, and says why)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    down = "model.layers.0.mlp.down_proj"
    for scheme, quantized in (("nvfp4", True), ("mxfp4", False), ("mxfp8", False)):
        code, out, err = run_inline(capsys, "quantize", tmp_path / "m", "-s", scheme, "-o", tmp_path / scheme, "--json")
        assert code == 0, err
        summary = json.loads(out)
        skipped = {s["module"]: s["reason"] for s in summary["skipped"]}
        assert (down in skipped) is not quantized, skipped
        if not quantized:
            assert skipped[down] == "input size 48 is not a multiple of the group size 32"
            assert down in read_config(tmp_path / scheme)["quantization_config"]["ignore"]
            assert read_tensors(tmp_path / scheme)[f"{down}.weight"].dtype == torch.bfloat16
