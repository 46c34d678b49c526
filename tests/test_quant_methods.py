"""Checkpoints stored in quantization methods qconvert does not read: refused with one line, never copied as if
they were full precision (issue 20: an MXFP4 gpt-oss went through ``quantize -s fp8-block`` with exit 0).

Every ``quant_method`` the installed transformers knows has a fixture here in its stored layout (a config and
plausible tensor names and dtypes); each is given to quantize, convert, batch and inspect. quantize, convert and
batch must exit 2 with exactly one line naming the method, write nothing at or beside the target and leave the
input's bytes unchanged; inspect describes it (exit 0) as not readable. The methods we do read go through.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qconvert.quant_methods import NOT_READABLE, READERS
from tests.conftest import run_cli, tree_digest

L = "model.layers.0.mlp.down_proj"  # the quantized layer of every fixture
OUT, IN = 64, 128
bf16, f16, f32, i32, u8, i8 = torch.bfloat16, torch.float16, torch.float32, torch.int32, torch.uint8, torch.int8
fp8 = torch.float8_e4m3fn


def z(*shape: int, dtype: torch.dtype = bf16) -> torch.Tensor:
    return torch.ones(shape, dtype=torch.float32).to(dtype) if dtype.is_floating_point else \
        torch.ones(shape, dtype=dtype)


def gptq_like() -> dict[str, torch.Tensor]:
    return {f"{L}.qweight": z(IN // 8, OUT, dtype=i32), f"{L}.qzeros": z(1, OUT // 8, dtype=i32),
            f"{L}.scales": z(1, OUT, dtype=f16), f"{L}.g_idx": z(IN, dtype=i32)}


# method -> (quantization_config, the layer's tensors in the method's stored layout)
Layout = tuple[dict, dict[str, torch.Tensor]]
LAYOUTS: dict[str, Callable[[], Layout]] = {
    "bitsandbytes": lambda: (
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        {f"{L}.weight": z(OUT * IN // 2, 1, dtype=u8), f"{L}.weight.absmax": z(OUT * IN // 64, dtype=f32),
         f"{L}.weight.quant_map": z(16, dtype=f32), f"{L}.weight.quant_state.bitsandbytes__nf4": z(80, dtype=u8)}),
    "bitsandbytes_8bit": lambda: (
        {"quant_method": "bitsandbytes", "load_in_8bit": True},
        {f"{L}.weight": z(OUT, IN, dtype=i8), f"{L}.SCB": z(OUT, dtype=f32), f"{L}.weight_format": z(1, dtype=u8)}),
    "gptq": lambda: ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}, gptq_like()),
    "awq": lambda: ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"},
                    {f"{L}.qweight": z(IN, OUT // 8, dtype=i32), f"{L}.qzeros": z(1, OUT // 8, dtype=i32),
                     f"{L}.scales": z(1, OUT, dtype=f16)}),
    "aqlm": lambda: ({"quant_method": "aqlm", "in_group_size": 8, "nbits_per_codebook": 16, "num_codebooks": 1},
                     {f"{L}.codes": z(OUT, IN // 8, 1, dtype=torch.int16),
                      f"{L}.codebooks": z(1, 65536, 1, 8, dtype=f16), f"{L}.scales": z(OUT, 1, 1, 1, dtype=f16)}),
    "vptq": lambda: ({"quant_method": "vptq", "config_for_layers": {}, "shared_layer_config": {}},
                     {f"{L}.indices": z(1, 4, 32, dtype=i32), f"{L}.centroids.weight": z(1, 256, dtype=f16)}),
    "quanto": lambda: ({"quant_method": "quanto", "weights": "int8"},
                       {f"{L}.weight._data": z(OUT, IN, dtype=i8), f"{L}.weight._scale": z(OUT, 1, dtype=bf16)}),
    "eetq": lambda: ({"quant_method": "eetq", "weights": "int8"},
                     {f"{L}.weight": z(IN, OUT, dtype=i8), f"{L}.weight_scales": z(OUT, dtype=f16)}),
    "higgs": lambda: ({"quant_method": "higgs", "bits": 4, "p": 2},
                      {f"{L}.weight": z(OUT, IN // 4, dtype=u8), f"{L}.scales": z(OUT, 1, dtype=f16),
                       f"{L}.tables": z(256, dtype=f16)}),
    "hqq": lambda: ({"quant_method": "hqq", "quant_config": {"weight_quant_params": {"nbits": 4}}},
                    {f"{L}.W_q": z(OUT * IN // 2, dtype=u8), f"{L}.scale": z(OUT * IN // 64, 1, dtype=bf16),
                     f"{L}.zero": z(OUT * IN // 64, 1, dtype=bf16)}),
    "fbgemm_fp8": lambda: ({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0},
                           {f"{L}.weight": z(OUT, IN, dtype=fp8), f"{L}.weight_scale": z(OUT, 1, dtype=f32),
                            f"{L}.input_scale_ub": z(1, dtype=f32)}),
    "torchao": lambda: ({"quant_method": "torchao", "quant_type": {"default": {"_type": "Int4WeightOnlyConfig"}}},
                        {f"{L}.weight_qdata": z(OUT, IN // 2, dtype=u8), f"{L}.weight_scale": z(IN // 32, OUT)}),
    "gguf": lambda: ({"quant_method": "gguf", "gguf_file": "model-Q4_K_M.gguf"}, {f"{L}.weight": z(OUT, IN)}),
    "bitnet": lambda: ({"quant_method": "bitnet", "linear_class": "bitlinear"},
                       {f"{L}.weight": z(OUT // 4, IN, dtype=u8), f"{L}.weight_scale": z(1)}),
    "spqr": lambda: ({"quant_method": "spqr", "bits": 3, "beta1": 16, "beta2": 16, "shapes": {}},
                     {f"{L}.dense_weights": z(OUT * IN * 3 // 64, dtype=torch.int64), f"{L}.row_offsets": z(OUT + 1,
                      dtype=i32), f"{L}.col_vals": z(8, dtype=i32), f"{L}.in_perm": z(IN, dtype=i32)}),
    "quark": lambda: ({"quant_method": "quark", "export": {"weight_format": "real_quantized"},
                       "global_quant_config": {"weight": {"dtype": "fp8_e4m3"}}},
                      {f"{L}.weight": z(OUT, IN, dtype=fp8), f"{L}.weight_scale": z(1, dtype=f32)}),
    "fp_quant": lambda: ({"quant_method": "fp_quant", "forward_dtype": "mxfp4", "hadamard_group_size": 32},
                         {f"{L}.qweight": z(OUT, IN // 2, dtype=u8), f"{L}.scales": z(OUT, IN // 32, dtype=u8),
                          f"{L}.forward_hadamard_matrix": z(32, 32)}),
    "auto-round": lambda: ({"quant_method": "auto-round", "bits": 4, "group_size": 128, "sym": True},
                           gptq_like()),
    "mxfp4": lambda: ({"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}, {
        "model.layers.0.mlp.experts.gate_up_proj_blocks": z(4, 2 * OUT, IN // 32, 16, dtype=u8),
        "model.layers.0.mlp.experts.gate_up_proj_scales": z(4, 2 * OUT, IN // 32, dtype=u8),
        "model.layers.0.mlp.experts.gate_up_proj_bias": z(4, 2 * OUT),
        "model.layers.0.mlp.experts.down_proj_blocks": z(4, IN, OUT // 32, 16, dtype=u8),
        "model.layers.0.mlp.experts.down_proj_scales": z(4, IN, OUT // 32, dtype=u8),
        "model.layers.0.mlp.experts.down_proj_bias": z(4, IN),
        "model.layers.0.mlp.router.weight": z(4, IN), "model.layers.0.mlp.router.bias": z(4)}),
    "nvfp4": lambda: ({"quant_method": "nvfp4"},
                      {f"{L}.weight": z(OUT, IN // 2, dtype=u8), f"{L}.weight_scale": z(OUT, IN // 16, dtype=fp8),
                       f"{L}.weight_scale_2": z(1, dtype=f32)}),
    "mxfp8": lambda: ({"quant_method": "mxfp8", "weight_block_size": [1, 32]},
                      {f"{L}.weight": z(OUT, IN, dtype=fp8), f"{L}.weight_scale_inv": z(OUT, IN // 32, dtype=u8)}),
    "metal": lambda: ({"quant_method": "metal", "bits": 4, "group_size": 64},
                      {f"{L}.weight": z(OUT, IN // 8, dtype=torch.uint32), f"{L}.scales": z(OUT, IN // 64),
                       f"{L}.biases": z(OUT, IN // 64)}),
    "fouroversix": lambda: ({"quant_method": "fouroversix"},
                            {f"{L}.weight": z(OUT, IN // 2, dtype=u8),
                             f"{L}.weight_scale": z(OUT, IN // 16, dtype=fp8)}),
    "sinq": lambda: ({"quant_method": "sinq", "nbits": 4, "group_size": 64},
                     {f"{L}.W_q": z(OUT, IN // 2, dtype=u8), f"{L}.scales": z(OUT, IN // 64)}),
    "gemma": lambda: ({"quant_method": "gemma", "num_bits": 4},
                      {f"{L}.weight": z(OUT, IN // 2, dtype=u8), f"{L}.weight_scale": z(OUT, 1)}),
    # Variants of methods we read, but not of these variants.
    "fp8 ue8m0": lambda: ({"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
                          {f"{L}.weight": z(OUT, IN, dtype=fp8), f"{L}.weight_scale_inv": z(1, 1, dtype=u8)}),
    "fp8 fp4 experts": lambda: ({"quant_method": "fp8", "weight_block_size": [128, 128], "expert_dtype": "fp4"},
                                {f"{L}.weight": z(OUT, IN, dtype=fp8), f"{L}.weight_scale_inv": z(1, 1, dtype=f32)}),
    "compressed-tensors sparse": lambda: (
        {"quant_method": "compressed-tensors", "format": "dense", "sparsity_config": {"format": "sparse-bitmask"}},
        {f"{L}.weight.shape": z(2, dtype=torch.int64), f"{L}.weight.compressed": z(OUT * IN // 2),
         f"{L}.weight.bitmask": z(OUT, IN // 8, dtype=u8), f"{L}.weight.row_offsets": z(OUT, dtype=i32)}),
    "compressed-tensors marlin-24": lambda: (
        {"quant_method": "compressed-tensors", "format": "marlin-24", "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 128}}}},
        {f"{L}.weight_packed": z(OUT // 16, IN * 2, dtype=i32), f"{L}.meta": z(OUT, IN // 64, dtype=torch.int16),
         f"{L}.scale_packed": z(1, OUT, dtype=f16)}),
    "unknown method": lambda: ({"quant_method": "exl2", "bits": 4.0},
                               {f"{L}.q_weight": z(IN // 8, OUT, dtype=i32), f"{L}.q_scale": z(8, dtype=i32)}),
}
# How each names itself in the refusal.
NEEDLE = {"bitsandbytes_8bit": "bitsandbytes 8-bit", "bitsandbytes": "bitsandbytes 4-bit nf4",
          "fp8 ue8m0": "ue8m0", "fp8 fp4 experts": "expert_dtype 'fp4'", "compressed-tensors sparse": "sparse-bitmask",
          "compressed-tensors marlin-24": "marlin-24", "unknown method": "exl2 (a method qconvert does not know)"}

# ModelOpt writes its own file beside config.json (and no quantization_config).
MODELOPT: dict[str, Layout] = {
    "NVFP4": ({"producer": {"name": "modelopt", "version": "0.29.0"},
               "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                                "exclude_modules": ["lm_head"]}},
              {f"{L}.weight": z(OUT, IN // 2, dtype=u8), f"{L}.weight_scale": z(OUT, IN // 16, dtype=fp8),
               f"{L}.weight_scale_2": z(dtype=f32), f"{L}.input_scale": z(dtype=f32)}),
    "FP8": ({"producer": {"name": "modelopt", "version": "0.29.0"}, "quantization": {"quant_algo": "FP8"}},
            {f"{L}.weight": z(OUT, IN, dtype=fp8), f"{L}.weight_scale": z(dtype=f32),
             f"{L}.input_scale": z(dtype=f32)}),
}

# Packed tensors and no quantization_config at all (a config someone stripped): the names still tell.
# (gpt-oss's own experts' *_blocks are read even without a config: only other *_blocks are refused.)
CONFIGLESS = {"gptq qweight": ("gptq", gptq_like),
              "mxfp4 blocks": ("mxfp4", lambda: {f"{L}.weight_blocks": z(OUT, IN // 32, 16, dtype=u8),
                                                 f"{L}.weight_scales": z(OUT, IN // 32, dtype=u8)}),
              "bitsandbytes absmax": ("bitsandbytes", lambda: LAYOUTS["bitsandbytes"]()[1])}


def build(folder: Path, qconfig: dict | None, layer: dict[str, torch.Tensor], extra: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    tensors = {"model.embed_tokens.weight": z(256, IN), "model.norm.weight": z(IN),
               "model.layers.0.self_attn.q_proj.weight": z(IN, IN), **layer}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
              "hidden_size": IN, "intermediate_size": OUT, "num_hidden_layers": 1, "vocab_size": 256}
    if qconfig is not None:
        config["quantization_config"] = qconfig
    (folder / "config.json").write_text(json.dumps(config))
    for name, data in (extra or {}).items():
        (folder / name).write_text(json.dumps(data))
    return folder


COMMANDS = ("quantize", "convert", "batch", "inspect")


def run(command: str, model: Path, scratch: Path) -> tuple[int, list[str], dict]:
    """``command`` on ``model`` with its output in ``scratch/outs``: exit code, stderr lines, and the JSON of
    inspect."""
    target = scratch / "outs" / "out"
    if command == "quantize":
        result = run_cli("quantize", model, "-s", "fp8-block", "-o", target, "-q")
    elif command == "convert":
        result = run_cli("convert", model, "--op", "dequantize", "-o", target, "-q")
    elif command == "batch":
        jobs = scratch / "jobs.yaml"
        jobs.write_text(f"jobs:\n  - model: {json.dumps(str(model))}\n    scheme: fp8-block\n"
                        f"    output: {json.dumps(str(target))}\n")
        result = run_cli("batch", jobs)
    else:
        result = run_cli("inspect", model, "--json")
    report = json.loads(result.stdout) if command == "inspect" and result.code == 0 else {}
    return result.code, result.stderr_lines, report


def check_refused(command: str, model: Path, tmp_path: Path, needles: tuple[str, ...]) -> None:
    (tmp_path / "outs").mkdir(exist_ok=True)
    before = tree_digest(model)
    code, lines, report = run(command, model, tmp_path)
    assert tree_digest(model) == before, "the input changed"
    assert os.listdir(tmp_path / "outs") == [], "something was written at or beside the target"
    if command == "inspect":
        assert code == 0, lines
        assert report["readable"] is False, report["format"]
        assert report["format"].endswith("; not readable by qconvert")
        for needle in needles:
            assert needle in report["format"], (needle, report["format"])
        return
    assert code == 2, (code, lines)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("method", [m for m in LAYOUTS if m not in READERS])
def test_unreadable_method_is_refused(method: str, command: str, tmp_path: Path) -> None:
    qconfig, layer = LAYOUTS[method]()
    model = build(tmp_path / "model", qconfig, layer)
    check_refused(command, model, tmp_path, (NEEDLE.get(method, method),))


@pytest.mark.parametrize("command", COMMANDS)
def test_modelopt_other_algorithms_are_refused(command: str, tmp_path: Path) -> None:
    """ModelOpt's NVFP4 and FP8 are read (tests/test_released.py); any other quant_algo is refused, named."""
    hf_quant_config, layer = MODELOPT["NVFP4"]
    hf_quant_config = {**hf_quant_config, "quantization": {"quant_algo": "W4A8_AWQ"}}
    model = build(tmp_path / "model", None, layer, {"hf_quant_config.json": hf_quant_config})
    check_refused(command, model, tmp_path, ("modelopt", "quant_algo W4A8_AWQ"))


@pytest.mark.parametrize("algo", list(MODELOPT))
def test_modelopt_nvfp4_and_fp8_are_read(algo: str, tmp_path: Path) -> None:
    hf_quant_config, layer = MODELOPT[algo]
    model = build(tmp_path / "model", None, layer, {"hf_quant_config.json": hf_quant_config})
    result = run_cli("inspect", model, "--json")
    assert result.code == 0 and json.loads(result.stdout)["readable"] is True, result.stderr
    out = tmp_path / "out"
    result = run_cli("quantize", model, "-s", "nvfp4" if algo == "NVFP4" else "fp8-block", "-o", out, "-q")
    assert result.code == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    assert not (out / "hf_quant_config.json").exists()


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(CONFIGLESS))
def test_packed_tensors_without_a_config_are_refused(case: str, command: str, tmp_path: Path) -> None:
    method, layer = CONFIGLESS[case]
    model = build(tmp_path / "model", None, layer())
    check_refused(command, model, tmp_path, (method,))


def test_every_transformers_method_has_a_fixture() -> None:
    """A method a newer transformers adds fails here until it has a layout above and a row in the table."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
    from transformers.utils.quantization_config import QuantizationMethod

    known = {m.value for m in QuantizationMethod} | set(AUTO_QUANTIZER_MAPPING) | set(AUTO_QUANTIZATION_CONFIG_MAPPING)
    for method in known:
        base = method.removesuffix("_4bit").removesuffix("_8bit")
        assert base in READERS or base in NOT_READABLE, method
        assert base in READERS or method in LAYOUTS or base in LAYOUTS, method


def test_mxfp4_gpt_oss_is_not_copied_as_bf16(tmp_path: Path) -> None:
    """The issue's case, on the command line as given there: gpt-oss's own config, fp8-block. The MXFP4 experts are
    read (qconvert.formats.gpt_oss), never copied as their stored bytes under a compressed-tensors config: fp8-block
    cannot hold them per expert for vLLM, so the run says so; kept whole, they are written dequantized and count
    in the coverage as unquantized."""
    qconfig, layer = LAYOUTS["mxfp4"]()
    model = build(tmp_path / "model", qconfig, layer)
    config = json.loads((model / "config.json").read_text())
    config.update(architectures=["GptOssForCausalLM"], model_type="gpt_oss", num_local_experts=4)
    (model / "config.json").write_text(json.dumps(config))
    result = run_cli("quantize", model, "-s", "fp8-block", "-o", tmp_path / "out")
    assert result.code == 2 and len(result.stderr_lines) == 1, result.stderr
    assert "experts" in result.stderr and "--keep-fused-experts" in result.stderr
    assert not (tmp_path / "out").exists()
    kept = run_cli("quantize", model, "-s", "fp8-block", "--keep-fused-experts", "-o", tmp_path / "out", "--json")
    assert kept.code == 0, kept.stderr
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        names = list(f.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert not any(name.endswith(("_blocks", "_scales")) for name in names)
    assert json.loads(kept.stdout)["coverage"]["share"] < 0.5


def test_inspect_text_names_the_method(tmp_path: Path) -> None:
    """The table's title holds the description: rich must print it as text (brackets and all), not as markup."""
    qconfig, layer = LAYOUTS["gptq"]()
    model = build(tmp_path / "model", qconfig, layer)
    result = run_cli("inspect", model)
    assert result.code == 0, result.stderr
    assert "gptq" in result.stdout and "not readable by qconvert" in result.stdout


def test_readable_methods_still_read(deepseek_fp8: Path, tmp_path: Path) -> None:
    """DeepSeek fp8 (and our own compressed-tensors output of it) go through every command as before."""
    for command in ("quantize", "convert", "inspect"):
        scratch = tmp_path / command
        (scratch / "outs").mkdir(parents=True)
        code, lines, report = run(command, deepseek_fp8, scratch)
        assert code == 0, lines
        if command == "inspect":
            assert report["readable"] is True and report["format"].startswith("DeepSeek-style FP8")
    ours = tmp_path / "quantize" / "outs" / "out"
    result = run_cli("inspect", ours, "--json")
    assert result.code == 0 and json.loads(result.stdout)["readable"] is True


def test_fp8_without_weight_block_size_is_per_tensor(tmp_path: Path) -> None:
    """transformers' FineGrainedFP8 with weight_block_size null is one scale per tensor: read as such."""
    layer = {f"{L}.weight": z(OUT, IN, dtype=fp8), f"{L}.weight_scale_inv": z(dtype=f32) * 2}
    model = build(tmp_path / "model", {"quant_method": "fp8", "weight_block_size": None}, layer)
    result = run_cli("inspect", model, "--json")
    assert result.code == 0, result.stderr
    (row,) = [r for r in json.loads(result.stdout)["layers"] if r["module"] == L]
    assert row["scheme"] == "fp8 per-tensor", row


def test_our_own_per_expert_output_is_not_requantized_silently(tmp_path: Path) -> None:
    """gpt-oss experts as qconvert writes them for vLLM (experts.N.w13_weight_packed) cannot be read back: a second
    quantize would copy them under the new scheme's config and leave them out of the coverage. Refused, naming
    one; inspect and verify still look at the checkpoint (verify names them as not verified)."""
    from tests.test_architectures import _case, build_checkpoint

    source = build_checkpoint(_case("gpt_oss"), tmp_path)
    first = tmp_path / "rtn4"
    assert run_cli("quantize", source, "-s", "rtn4", "-o", first, "-q").code == 0
    for command in ("quantize", "convert", "batch"):
        check_refused(command, first, tmp_path, ("_weight_packed", "vLLM's per-expert layout"))
    report = json.loads(run_cli("inspect", first, "--json").stdout)
    assert report["readable"] is True
