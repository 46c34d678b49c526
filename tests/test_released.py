"""Quantized releases as inputs, and exact casts between FP4 formats.

* gpt-oss's MXFP4 experts (``*_blocks`` / ``*_scales``): a tiny gpt-oss built by transformers, its experts rewritten
  in the released layout. The reference consumer is transformers: its own MXFP4 dequantization
  (``integrations.mxfp4.convert_moe_packed_tensors``) and its MXFP4 loader with ``dequantize=True`` (its CPU path).
* ModelOpt NVFP4 and FP8 (a Llama and a Qwen3-MoE): read as vLLM's ModelOpt methods compute them; the engine tier
  (tests/engines/test_vllm_released.py) loads the same fixtures with vLLM's own ModelOpt loaders.
* MXFP4 → NVFP4: element by element through compressed-tensors' own decompressors.

The fixtures are built by tests/released_fixtures.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from tests.arch_matrix import _GPT_OSS, _MOE, _TEXT
from tests.conftest import read_tensors, run_cli, tree_digest
from tests.released_fixtures import LINEARS, to_modelopt_fp8, to_modelopt_nvfp4, to_mxfp4_release

QWEN3_MOE = dict(_TEXT, head_dim=32, moe_intermediate_size=128, decoder_sparse_step=1, **_MOE)


def linear_count(tensors: dict[str, torch.Tensor]) -> int:
    """The attention and MLP (and expert) linear layers of a Llama or Qwen3-MoE checkpoint."""
    return len({name.rpartition(".")[0] for name in tensors if name.rpartition(".")[0].rpartition(".")[2] in LINEARS})


@pytest.fixture(scope="module")
def gpt_oss_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("released") / "gpt-oss-bf16"
    config = transformers.AutoConfig.for_model("gpt_oss", **_GPT_OSS)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(gpt_oss_bf16: Path) -> Path:
    return to_mxfp4_release(gpt_oss_bf16, gpt_oss_bf16.parent / "gpt-oss-mxfp4")


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    return read_tensors(folder)


def _transformers_dequantized(folder: Path) -> dict[str, torch.Tensor]:
    """Each expert tensor as transformers' MXFP4 integration dequantizes it."""
    tensors = _stored(folder)
    return {name.removesuffix("_blocks"): convert_moe_packed_tensors(tensors[name], tensors[name[:-6] + "scales"])
            for name in tensors if name.endswith("_blocks")}


def test_the_fixture_is_what_transformers_reads(gpt_oss_mxfp4: Path, gpt_oss_bf16: Path) -> None:
    """Before we touch it: transformers' own dequantization reads the fixture back near the bf16 weights."""
    reference = _transformers_dequantized(gpt_oss_mxfp4)
    original = read_tensors(gpt_oss_bf16)
    assert len(reference) == 2 * _GPT_OSS["num_hidden_layers"]
    for name, weight in reference.items():
        assert weight.shape == original[name].shape
        error = (weight.float() - original[name].float()).norm() / original[name].float().norm()
        assert 0 < error < 0.2, (name, error)


def test_dequantize_equals_transformers(gpt_oss_mxfp4: Path, tmp_path: Path) -> None:
    """``convert --op dequantize``: every expert tensor bit-identical to transformers' dequantization, the
    rest copied, the MXFP4 quantization_config gone, and transformers loads the result as a bf16 gpt-oss."""
    before = tree_digest(gpt_oss_mxfp4)
    out = tmp_path / "bf16"
    result = run_cli("convert", gpt_oss_mxfp4, "--op", "dequantize", "-o", out, "-q")
    assert result.code == 0, result.stderr
    assert tree_digest(gpt_oss_mxfp4) == before
    written, reference, stored = read_tensors(out), _transformers_dequantized(gpt_oss_mxfp4), _stored(gpt_oss_mxfp4)
    for name, weight in reference.items():
        assert written[name].dtype == torch.bfloat16 and torch.equal(written[name], weight), name
    for name, tensor in stored.items():
        if not name.endswith(("_blocks", "_scales")):
            assert torch.equal(written[name], tensor), name
    assert not any(name.endswith(("_blocks", "_scales")) for name in written)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_dequantized_logits_equal_transformers_mxfp4_loader(gpt_oss_mxfp4: Path, tmp_path: Path) -> None:
    """transformers' MXFP4 loader (dequantize=True, its CPU path) and our dequantized checkpoint compute the same
    logits: the same weights, read by two readers."""
    out = tmp_path / "bf16"
    assert run_cli("convert", gpt_oss_mxfp4, "--op", "dequantize", "-o", out, "-q").code == 0
    ids = torch.randint(3, 200, (1, 10), generator=torch.Generator().manual_seed(0))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        gpt_oss_mxfp4, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.bfloat16)
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)


def test_requantize_needs_consent(gpt_oss_mxfp4: Path, tmp_path: Path) -> None:
    result = run_cli("quantize", gpt_oss_mxfp4, "-s", "rtn4", "-o", tmp_path / "out")
    assert result.code == 2
    [line] = result.stderr_lines
    assert "gpt-oss MXFP4" in line and "--allow-requantize" in line and ".mlp.experts." in line
    assert not (tmp_path / "out").exists()


def test_requantized_equals_quantizing_the_dequantized(gpt_oss_mxfp4: Path, tmp_path: Path) -> None:
    """With --allow-requantize, an MXFP4 release quantizes to the bytes its dequantized bf16 checkpoint gives:
    one reader, one planner (per-expert w13/w2 as vLLM's gpt-oss loader streams them)."""
    bf16, direct, via = tmp_path / "bf16", tmp_path / "direct", tmp_path / "via"
    assert run_cli("convert", gpt_oss_mxfp4, "--op", "dequantize", "-o", bf16, "-q").code == 0
    result = run_cli("quantize", gpt_oss_mxfp4, "-s", "rtn4", "--allow-requantize", "-o", direct, "-q")
    assert result.code == 0, result.stderr
    assert run_cli("quantize", bf16, "-s", "rtn4", "-o", via, "-q").code == 0
    ours, reference = read_tensors(direct), read_tensors(via)
    assert ours.keys() == reference.keys()
    assert any(".experts.0.w13_weight_packed" in name for name in ours)
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name
    assert json.loads((direct / "config.json").read_text())["quantization_config"]["quant_method"] \
        == "compressed-tensors"


def test_kept_experts_are_written_as_the_bf16_release(gpt_oss_mxfp4: Path, tmp_path: Path) -> None:
    """A scheme vLLM's gpt-oss loader does not stream per expert (fp8-block) keeps the experts 3-D: written
    dequantized, as the bf16 release holds them, never as MXFP4 bytes under a compressed-tensors config."""
    out = tmp_path / "out"
    result = run_cli("quantize", gpt_oss_mxfp4, "-s", "fp8-block", "--keep-fused-experts", "-o", out, "--json")
    assert result.code == 0, result.stderr
    written, reference = read_tensors(out), _transformers_dequantized(gpt_oss_mxfp4)
    assert not any(name.endswith(("_blocks", "_scales")) for name in written)
    for name, weight in reference.items():
        assert torch.equal(written[name], weight), name
    summary = json.loads(result.stdout)
    assert summary["coverage"]["share"] < 0.9  # the experts count, unquantized
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def _damaged(gpt_oss_mxfp4: Path, tmp_path: Path, change) -> Path:
    folder = tmp_path / "damaged"
    shutil.copytree(gpt_oss_mxfp4, folder)
    with safe_open(folder / "model.safetensors", "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


NAME = "model.layers.0.mlp.experts.gate_up_proj"


def _nan_scale(t: dict) -> None:
    t[NAME + "_scales"][0, 0, 0] = 255


def _drop_scales(t: dict) -> None:
    del t[NAME + "_scales"]


def _truncate_blocks(t: dict) -> None:
    t[NAME + "_blocks"] = t[NAME + "_blocks"][..., :8].contiguous()


def _scales_wrong_shape(t: dict) -> None:
    t[NAME + "_scales"] = t[NAME + "_scales"][:, :-1].contiguous()


def _blocks_as_float(t: dict) -> None:
    t[NAME + "_blocks"] = t[NAME + "_blocks"].to(torch.float32)


@pytest.mark.parametrize(("change", "needles"), [
    (_nan_scale, ["E8M0 NaN", NAME + "_scales"]),
    (_drop_scales, [NAME + "_blocks", "no " + NAME + "_scales"]),
    (_truncate_blocks, [NAME + "_blocks", "[E, R, G, 16]"]),
    (_scales_wrong_shape, [NAME + "_scales", "[E, R, G]"]),
    (_blocks_as_float, [NAME + "_blocks", "uint8"]),
], ids=["nan-scale", "half-pair", "truncated-blocks", "scales-shape", "float-blocks"])
@pytest.mark.parametrize("command", ["dequantize", "requantize"])
def test_damaged_releases_are_refused(gpt_oss_mxfp4: Path, tmp_path: Path, change, needles: list[str],
                                      command: str) -> None:
    folder = _damaged(gpt_oss_mxfp4, tmp_path, change)
    before = tree_digest(folder)
    out = tmp_path / "out"
    args = (["convert", folder, "--op", "dequantize"] if command == "dequantize"
            else ["quantize", folder, "-s", "rtn4", "--allow-requantize"])
    result = run_cli(*args, "-o", out, "-q")
    assert result.code == 2, result.stderr
    assert len(result.stderr_lines) == 1, result.stderr
    assert all(needle in result.stderr for needle in needles), result.stderr
    assert tree_digest(folder) == before
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["damaged"]


# ---------------------------------------------------------------- ModelOpt NVFP4

@pytest.fixture(scope="module", params=["llama", "qwen3_moe"])
def bf16_source(request: pytest.FixtureRequest, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dense and an MoE model (Qwen3-MoE: per-expert gate/up/down, which ModelOpt quantizes expert by expert)."""
    if request.param == "llama":
        return tiny_llama
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("released") / "qwen3-moe-bf16"
    config = transformers.AutoConfig.for_model("qwen3_moe", **QWEN3_MOE)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def modelopt_nvfp4(bf16_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return to_modelopt_nvfp4(bf16_source, tmp_path_factory.mktemp("modelopt") / "nvfp4")


def test_modelopt_nvfp4_to_compressed_tensors_is_a_relayout(modelopt_nvfp4: Path, tmp_path: Path) -> None:
    """``quantize -s nvfp4`` on a ModelOpt NVFP4 release: codes and block scales bit for bit, the global scale
    the float32 inverse of ``weight_scale_2`` (shared as the release shares it), static input scales dropped."""
    before = tree_digest(modelopt_nvfp4)
    out = tmp_path / "out"
    result = run_cli("quantize", modelopt_nvfp4, "-s", "nvfp4", "-o", out)
    assert result.code == 0, result.stderr
    assert tree_digest(modelopt_nvfp4) == before
    stored, written = read_tensors(modelopt_nvfp4), read_tensors(out)
    modules = [name.removesuffix(".weight_scale_2") for name in stored if name.endswith(".weight_scale_2")]
    assert len(modules) == linear_count(stored)
    for module in modules:
        assert torch.equal(written[f"{module}.weight_packed"], stored[f"{module}.weight"]), module
        assert torch.equal(written[f"{module}.weight_scale"].view(torch.uint8),
                           stored[f"{module}.weight_scale"].view(torch.uint8)), module
        assert torch.equal(written[f"{module}.weight_global_scale"],
                           (1.0 / stored[f"{module}.weight_scale_2"]).reshape(1)), module
        assert f"{module}.input_scale" not in written
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert "static activation scales" in result.stderr


def test_modelopt_nvfp4_dequantized_by_compressed_tensors(modelopt_nvfp4: Path, tmp_path: Path) -> None:
    """Our reading of the release (``convert --op dequantize``: code x (scale x scale_2) in float32, as vLLM's
    ModelOpt method computes it) against compressed-tensors' own NVFP4 decompressor on the re-laid-out output:
    equal but where the inverse's float32 rounding moves a bf16 value, which is rare and counted here."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    out, plain = tmp_path / "out", tmp_path / "plain"
    assert run_cli("quantize", modelopt_nvfp4, "-s", "nvfp4", "-o", out, "-q").code == 0
    assert run_cli("convert", modelopt_nvfp4, "--op", "dequantize", "-o", plain, "-q").code == 0
    ours, written = read_tensors(plain), read_tensors(out)
    preset = preset_name_to_scheme("NVFP4A16", ["Linear"])
    modules = [name.removesuffix(".weight_global_scale") for name in written if name.endswith(".weight_global_scale")]
    differing = total = 0
    for module in modules:
        leaves = {name.rpartition(".")[2]: t for name, t in written.items() if name.rpartition(".")[0] == module}
        reference = NVFP4PackedCompressor.decompress(leaves, preset)["weight"].to(torch.bfloat16)
        differing += int((ours[f"{module}.weight"] != reference).sum())
        total += reference.numel()
    print(f"differing {differing} of {total}")
    assert len(modules) == linear_count(ours) and differing <= total * 1e-3, (differing, total)


# ---------------------------------------------------------------- MXFP4 → NVFP4, exactly

def _decompressed(folder: Path, preset: str) -> dict[str, torch.Tensor]:
    """Every quantized layer's weight as compressed-tensors' own decompressor for ``preset`` rebuilds it (float32)."""
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    compressor = {"MXFP4A16": MXFP4PackedCompressor, "NVFP4A16": NVFP4PackedCompressor}[preset]
    scheme = preset_name_to_scheme(preset, ["Linear"])
    tensors = read_tensors(folder)
    modules = {name.rpartition(".")[0] for name in tensors if name.endswith(".weight_packed")}
    return {module: compressor.decompress({name.rpartition(".")[2]: t for name, t in tensors.items()
                                           if name.rpartition(".")[0] == module}, scheme)["weight"].float()
            for module in modules}


@pytest.fixture(scope="module")
def llama_mxfp4(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mx") / "llama-mxfp4"
    assert run_cli("quantize", tiny_llama, "-s", "mxfp4", "-o", out, "-q").code == 0
    return out


def test_mxfp4_to_nvfp4_is_lossless(llama_mxfp4: Path, tmp_path: Path) -> None:
    """``quantize -s nvfp4`` on an MXFP4 checkpoint needs no --allow-requantize: nibbles kept bit for bit, and every
    element compressed-tensors' NVFP4 decompressor rebuilds from the output equals what its MXFP4 decompressor
    rebuilds from the input; q/k/v and gate/up share one power-of-two global scale each."""
    before = tree_digest(llama_mxfp4)
    out = tmp_path / "nvfp4"
    result = run_cli("quantize", llama_mxfp4, "-s", "nvfp4", "-o", out, "-q")
    assert result.code == 0, result.stderr
    assert tree_digest(llama_mxfp4) == before
    source, written = read_tensors(llama_mxfp4), read_tensors(out)
    modules = [name.removesuffix(".weight_packed") for name in written if name.endswith(".weight_packed")]
    assert len(modules) == 14
    for module in modules:
        assert torch.equal(written[f"{module}.weight_packed"], source[f"{module}.weight_packed"]), module
        global_scale = float(written[f"{module}.weight_global_scale"])
        assert global_scale == 2.0 ** round(torch.log2(torch.tensor(global_scale)).item()), module
    for layer in ("model.layers.0.self_attn", "model.layers.1.mlp"):
        fused = [n for n in written if n.startswith(layer) and n.endswith("weight_global_scale")
                 and ".o_proj." not in n and ".down_proj." not in n]
        assert len(fused) in (2, 3) and len({float(written[n]) for n in fused}) == 1, fused
    theirs, ours = _decompressed(llama_mxfp4, "MXFP4A16"), _decompressed(out, "NVFP4A16")
    assert theirs.keys() == ours.keys()
    for module, weight in theirs.items():
        assert torch.equal(ours[module], weight), module


def _spread_exponents(folder: Path, module: str, exponent: int) -> Path:
    """``folder`` with one block of ``module`` given a scale far below the rest (2**(exponent - 127))."""
    tensors = read_tensors(folder)
    scale = tensors[f"{module}.weight_scale"].clone()
    scale[0, 0] = exponent
    tensors[f"{module}.weight_scale"] = scale
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    for stale in folder.glob("model-*.safetensors"):
        stale.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    return folder


def test_mxfp4_blocks_beyond_e4m3_are_refused_then_flushed_with_consent(llama_mxfp4: Path, tmp_path: Path) -> None:
    """A block 30 exponents below its group's largest has no exact e4m3 scale: refused before any write, naming the
    layer and the count; with --allow-requantize it is flushed to zero, said in a note, and every other element
    still equals the source's."""
    module = "model.layers.0.self_attn.k_proj"
    folder = _spread_exponents(Path(shutil.copytree(llama_mxfp4, tmp_path / "spread")), module,
                               int(read_tensors(llama_mxfp4)[f"{module}.weight_scale"].max()) - 30)
    before = tree_digest(folder)
    out = tmp_path / "out"
    refused = run_cli("quantize", folder, "-s", "nvfp4", "-o", out, "-q")
    assert refused.code == 2 and len(refused.stderr_lines) == 1, refused.stderr
    assert module in refused.stderr and "1 of " in refused.stderr and "--allow-requantize" in refused.stderr
    assert not out.exists() and tree_digest(folder) == before
    accepted = run_cli("quantize", folder, "-s", "nvfp4", "--allow-requantize", "-o", out)
    assert accepted.code == 0, accepted.stderr
    assert "1 blocks in 1 layers" in accepted.stderr and "rounded, to zero at worst" in accepted.stderr
    theirs, ours = _decompressed(folder, "MXFP4A16"), _decompressed(out, "NVFP4A16")
    for name, weight in theirs.items():
        if name != module:
            assert torch.equal(ours[name], weight), name
    differs = ours[module] != theirs[module]
    assert bool(differs.any()) and not bool(differs[:, 32:].any()) and not bool(differs[1:].any())
    assert bool((ours[module][0, :32] == 0).all())


def test_mxfp4_zero_blocks_stay_exact(llama_mxfp4: Path, tmp_path: Path) -> None:
    """A block MX writers store as all zero with exponent 0 (2**-127) is far below the rest, yet exact: no refusal."""
    module = "model.layers.1.mlp.up_proj"
    folder = Path(shutil.copytree(llama_mxfp4, tmp_path / "zeros"))
    tensors = read_tensors(folder)
    packed = tensors[f"{module}.weight_packed"].clone()
    packed[0, :16] = 0
    tensors[f"{module}.weight_packed"] = packed
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    for stale in folder.glob("model-*.safetensors"):
        stale.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    _spread_exponents(folder, module, 0)
    out = tmp_path / "out"
    result = run_cli("quantize", folder, "-s", "nvfp4", "-o", out, "-q")
    assert result.code == 0, result.stderr
    theirs, ours = _decompressed(folder, "MXFP4A16"), _decompressed(out, "NVFP4A16")
    for name, weight in theirs.items():
        assert torch.equal(ours[name], weight), name


# ---------------------------------------------------------------- ModelOpt FP8

@pytest.fixture(scope="module")
def modelopt_fp8(bf16_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return to_modelopt_fp8(bf16_source, tmp_path_factory.mktemp("modelopt") / "fp8")


def test_modelopt_fp8_reads_as_vllm_computes(modelopt_fp8: Path, tmp_path: Path) -> None:
    """``convert --op dequantize``: each weight ``fp8 x weight_scale`` in float32, rounded once to bf16 (vLLM's
    ModelOpt FP8 method and compressed-tensors' per-tensor FP8 read it so)."""
    out = tmp_path / "plain"
    assert run_cli("convert", modelopt_fp8, "--op", "dequantize", "-o", out, "-q").code == 0
    stored, plain = read_tensors(modelopt_fp8), read_tensors(out)
    modules = [n.removesuffix(".weight_scale") for n in stored if n.endswith(".weight_scale")]
    assert len(modules) == linear_count(plain)
    for module in modules:
        want = (stored[f"{module}.weight"].float() * stored[f"{module}.weight_scale"].float()).to(torch.bfloat16)
        assert torch.equal(plain[f"{module}.weight"], want), module
        assert f"{module}.input_scale" not in plain


@pytest.mark.parametrize("scheme", ["fp8-tensor", "fp8", "fp8-block"])
def test_modelopt_fp8_to_our_schemes(modelopt_fp8: Path, tmp_path: Path, scheme: str) -> None:
    """fp8 → fp8 needs no consent (requantizing fp8 codes into fp8 loses nothing measurable, as for DeepSeek FP8);
    the output is a compressed-tensors checkpoint transformers loads, near the release's weights."""
    out = tmp_path / scheme
    result = run_cli("quantize", modelopt_fp8, "-s", scheme, "-o", out, "-q")
    assert result.code == 0, result.stderr
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)  # loads: names and shapes as CT's
    plain = tmp_path / "plain"
    assert run_cli("convert", out, "--op", "dequantize", "-o", plain, "-q").code == 0
    stored, rebuilt = read_tensors(modelopt_fp8), read_tensors(plain)
    for module in [n.removesuffix(".weight_scale") for n in stored if n.endswith(".weight_scale")]:
        want = stored[f"{module}.weight"].float() * stored[f"{module}.weight_scale"].float()
        error = (rebuilt[f"{module}.weight"].float() - want).norm() / want.norm()
        assert error < 0.05, (module, error)


def test_mxfp4_to_fp8_block_is_lossless(llama_mxfp4: Path, tmp_path: Path) -> None:
    """``quantize -s fp8-block`` on an MXFP4 checkpoint (for GPUs without FP4): every 128x128 tile's scale a power of
    two, every element that compressed-tensors' fp8-block reading rebuilds equal to its MXFP4 decompression."""
    out, plain = tmp_path / "fp8", tmp_path / "plain"
    result = run_cli("quantize", llama_mxfp4, "-s", "fp8-block", "-o", out, "-q")
    assert result.code == 0, result.stderr
    written, theirs = read_tensors(out), _decompressed(llama_mxfp4, "MXFP4A16")
    for module, weight in theirs.items():
        scale = written[f"{module}.weight_scale"].float()
        assert bool((scale == torch.exp2(torch.log2(scale).round())).all()), module
        expanded = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: weight.shape[0], : weight.shape[1]]
        assert torch.equal(written[f"{module}.weight"].float() * expanded, weight), module
    assert run_cli("convert", out, "--op", "dequantize", "-o", plain, "-q").code == 0
    rebuilt = read_tensors(plain)
    for module, weight in theirs.items():
        assert torch.equal(rebuilt[f"{module}.weight"], weight.to(torch.bfloat16)), module


def test_mxfp4_to_fp8_block_refuses_a_wide_tile(llama_mxfp4: Path, tmp_path: Path) -> None:
    module = "model.layers.1.self_attn.o_proj"
    folder = _spread_exponents(Path(shutil.copytree(llama_mxfp4, tmp_path / "spread")), module,
                               int(read_tensors(llama_mxfp4)[f"{module}.weight_scale"].max()) - 20)
    out = tmp_path / "out"
    refused = run_cli("quantize", folder, "-s", "fp8-block", "-o", out, "-q")
    assert refused.code == 2 and len(refused.stderr_lines) == 1, refused.stderr
    assert module in refused.stderr and "1 of " in refused.stderr and not out.exists()
    accepted = run_cli("quantize", folder, "-s", "fp8-block", "--allow-requantize", "-o", out)
    assert accepted.code == 0 and "1 blocks in 1 layers" in accepted.stderr, accepted.stderr


# ---------------------------------------------------------------- CUDA: the same bytes as the CPU path

@pytest.mark.gpu
@pytest.mark.parametrize(("source", "args"), [
    ("mxfp4-llama", ("-s", "nvfp4")), ("mxfp4-llama", ("-s", "fp8-block")),
    ("mxfp4-spread", ("-s", "nvfp4", "--allow-requantize")),
    ("mxfp4-spread", ("-s", "fp8-block", "--allow-requantize")),
    ("modelopt-nvfp4", ("-s", "nvfp4")), ("modelopt-fp8", ("-s", "fp8-block")),
    ("gpt-oss-mxfp4", ("-s", "rtn4", "--allow-requantize")),
], ids=lambda value: value if isinstance(value, str) else "-".join(value).replace("--", ""))
def test_cuda_writes_the_cpu_bytes(request: pytest.FixtureRequest, tmp_path: Path, source: str,
                                   args: tuple[str, ...]) -> None:
    if source.startswith("modelopt"):
        build = to_modelopt_nvfp4 if source.endswith("nvfp4") else to_modelopt_fp8
        folder = build(request.getfixturevalue("tiny_llama"), tmp_path / "release")
    elif source == "mxfp4-spread":  # blocks 30 below the rest, and zero blocks: the casts' rounded and exact edges
        mxfp4 = request.getfixturevalue("llama_mxfp4")
        module = "model.layers.0.self_attn.k_proj"
        folder = _spread_exponents(Path(shutil.copytree(mxfp4, tmp_path / "spread")), module,
                                   int(read_tensors(mxfp4)[f"{module}.weight_scale"].max()) - 30)
        _spread_exponents(folder, "model.layers.1.mlp.up_proj", 0)
    else:
        folder = request.getfixturevalue({"mxfp4-llama": "llama_mxfp4", "gpt-oss-mxfp4": "gpt_oss_mxfp4"}[source])
    outputs = {}
    for device in ("cpu", "cuda"):
        outputs[device] = tmp_path / device
        result = run_cli("quantize", folder, *args, "--device", device, "-o", outputs[device], "-q")
        assert result.code == 0, result.stderr
    assert tree_digest(outputs["cpu"]) == tree_digest(outputs["cuda"])


# ---------------------------------------------------------------- hostile releases

def _rewrite(folder: Path, change) -> Path:
    tensors = read_tensors(folder)
    change(tensors)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


LAYER = "model.layers.0.self_attn.q_proj"


def _no_scale_2(t: dict) -> None:
    del t[f"{LAYER}.weight_scale_2"]


def _scale_rows_cut(t: dict) -> None:
    t[f"{LAYER}.weight_scale"] = t[f"{LAYER}.weight_scale"][1:].contiguous()


def _scale_2_vector(t: dict) -> None:
    t[f"{LAYER}.weight_scale_2"] = torch.ones(3)


def _both_spellings(t: dict) -> None:
    t[f"{LAYER}.weight_packed"] = t[f"{LAYER}.weight"].clone()


def _scale_as_bf16(t: dict) -> None:
    t[f"{LAYER}.weight_scale"] = t[f"{LAYER}.weight_scale"].to(torch.bfloat16)


@pytest.mark.parametrize(("change", "needles"), [
    (_no_scale_2, [LAYER]),
    (_scale_rows_cut, [f"{LAYER}.weight_scale", "need"]),
    (_scale_2_vector, [f"{LAYER}.weight_scale_2", "one float32"]),
    (_both_spellings, [LAYER]),
    (_scale_as_bf16, [LAYER]),
], ids=["no-scale-2", "scale-rows", "scale-2-vector", "weight-and-weight-packed", "bf16-scale"])
def test_damaged_modelopt_nvfp4_is_refused(tiny_llama: Path, tmp_path: Path, change, needles: list[str]
                                           ) -> None:
    folder = _rewrite(to_modelopt_nvfp4(tiny_llama, tmp_path / "release"), change)
    before = tree_digest(folder)
    for args in (("quantize", folder, "-s", "nvfp4"), ("convert", folder, "--op", "dequantize")):
        out = tmp_path / "out"
        result = run_cli(*args, "-o", out, "-q")
        assert result.code == 2 and len(result.stderr_lines) == 1, (args[0], result.stderr)
        assert all(needle in result.stderr for needle in needles), result.stderr
        assert tree_digest(folder) == before and not out.exists()


def test_a_tensor_stored_both_ways_is_refused(gpt_oss_mxfp4: Path, tmp_path: Path) -> None:
    """An expert tensor present as MXFP4 blocks and as a plain tensor: which one is the model? Refused, named."""
    folder = Path(shutil.copytree(gpt_oss_mxfp4, tmp_path / "mixed"))
    _rewrite(folder, lambda t: t.__setitem__(NAME, torch.zeros(4, 128, 256, dtype=torch.bfloat16)))
    result = run_cli("quantize", folder, "-s", "rtn4", "--allow-requantize", "-o", tmp_path / "out", "-q")
    assert result.code == 2 and len(result.stderr_lines) == 1, result.stderr
    assert NAME in result.stderr and NAME + "_blocks" in result.stderr


def test_batch_writes_what_quantize_writes(llama_mxfp4: Path, tiny_llama: Path, tmp_path: Path) -> None:
    """The exact casts and the ModelOpt reader run through the one pipeline: ``batch`` gives quantize's bytes."""
    release = to_modelopt_nvfp4(tiny_llama, tmp_path / "modelopt")
    direct = {"mx": tmp_path / "direct-mx", "mo": tmp_path / "direct-mo"}
    assert run_cli("quantize", llama_mxfp4, "-s", "nvfp4", "-o", direct["mx"], "-q").code == 0
    assert run_cli("quantize", release, "-s", "nvfp4", "-o", direct["mo"], "-q").code == 0
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(f"jobs:\n  - model: {llama_mxfp4}\n    scheme: nvfp4\n    output: {tmp_path / 'batch-mx'}\n"
                    f"  - model: {release}\n    scheme: nvfp4\n    output: {tmp_path / 'batch-mo'}\n")
    result = run_cli("batch", jobs, "-q")
    assert result.code == 0, result.stderr
    for key, out in (("mx", tmp_path / "batch-mx"), ("mo", tmp_path / "batch-mo")):
        ours, reference = read_tensors(out), read_tensors(direct[key])
        assert ours.keys() == reference.keys()
        assert all(torch.equal(ours[name], tensor) for name, tensor in reference.items()), key
