"""The architecture matrix: every architecture of tests/arch_matrix.py, in every scheme its loaders support.

For each (architecture, scheme): the planned set of quantized modules equals the set written out in
the matrix; every quantized nn.Linear is quantized as [out, in]; the output loads in transformers
through both compressed-tensors paths (compressed, and ``dequantize=True``) with no missing,
unexpected or mismatched keys; and its logits match an independent fake-quantization of the same
layers, written here in plain torch (not qconvert's quantizers), within a small fraction of the
quantization error itself.

The full matrix is ``@pytest.mark.arch`` (``make arch``); the cases marked ``fast`` in the matrix
run in rtn4 and fp8 in the default tier.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qconvert.errors import BadInputError
from qconvert.pipeline import QuantizeRequest, quantize
from qconvert.schemes import get_scheme
from tests.arch_matrix import CASES, EXPERTS, ArchCase
from tests.conftest import run_cli

transformers = pytest.importorskip("transformers")
from transformers.utils.quantization_config import CompressedTensorsConfig  # noqa: E402

FAST = {"rtn4", "fp8"}
SEED = 0

# ---------------------------------------------------------------- independent fake quantization

# Modules a runtime fuses into one matrix, so fp8-tensor gives them one shared scale (vLLM's map).
_FUSED = [re.compile(p) for p in (
    r"^(.*\.self_attn)\.(q_proj|k_proj|v_proj)$",
    r"^(.*\.self_attn)\.(q_a_proj|kv_a_proj_with_mqa)$",
    r"^(.*\.attention\.self)\.(query|key|value)$",
    r"^(.*\.(mlp|experts\.\d+|shared_experts))\.(gate_proj|up_proj)$",
    r"^(.*\.experts\.\d+)\.(w1|w3)$",
)]


def _fused_key(module: str, mla: bool) -> str:
    for index, pattern in enumerate(_FUSED):
        if index == 1 and not mla:
            continue
        match = pattern.match(module)
        if match:
            return f"{index}:{match.group(1)}"
    return module


def _tiles(weight: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad to whole tiles, as [R, rows, C, cols]."""
    out, inp = weight.shape
    padded = torch.nn.functional.pad(weight, (0, -inp % cols, 0, -out % rows))
    r, c = padded.shape[0] // rows, padded.shape[1] // cols
    return padded.reshape(r, rows, c, cols), (out, inp)


MICROSCALED = ("nvfp4", "mxfp4", "mxfp8")
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _nearest_e2m1(v: torch.Tensor) -> torch.Tensor:
    """The E2M1 value nearest to each element (saturating at ±6), ties to the even code (0.75 → 1, 1.75 → 2)."""
    distance = (v.abs().unsqueeze(-1) - _E2M1).abs()
    nearest = distance == distance.amin(dim=-1, keepdim=True)
    even = (torch.arange(len(_E2M1)) % 2 == 0).to(torch.int64)
    index = (nearest.to(torch.int64) * (1 + even)).argmax(dim=-1)
    return _E2M1[index] * v.sign()


def _fake_microscaled(weight: torch.Tensor, scheme: str, shared_amax: torch.Tensor | None) -> torch.Tensor:
    """NVFP4: e4m3 scale per 16 inputs under a global scale 2688 / amax (the fused matrix's amax); MX: a power-of-two
    scale per 32 inputs, the exponent of the group's amax rounded up from a significand of 1.75, minus the element
    type's largest exponent (2 for E2M1, 8 for e4m3)."""
    w = weight.to(torch.float32)
    group = 16 if scheme == "nvfp4" else 32
    groups = w.reshape(w.shape[0], -1, group)
    amax = groups.abs().amax(dim=-1, keepdim=True)
    if scheme == "nvfp4":
        # In bf16 as the spec computes it: the global scale is 2688 times amax's bf16 reciprocal, rounded to bf16;
        # a block's scale is global x bf16(amax / 6) rounded to e4m3.
        tensor_amax = (shared_amax if shared_amax is not None else weight.abs().amax()).to(torch.bfloat16)
        global_scale = (tensor_amax.reciprocal() * 2688).to(torch.float32)
        block = (amax.to(torch.bfloat16) / 6).to(torch.float32)
        scale = (global_scale * block).clamp(max=448).to(torch.float8_e4m3fn).to(torch.float32) / global_scale
        q = _nearest_e2m1(groups / scale)
    else:
        mantissa, exponent = torch.frexp(amax)
        power = exponent - 1 + (mantissa >= 0.875).to(exponent.dtype)
        scale = torch.exp2((power - (2 if scheme == "mxfp4" else 8)).to(torch.float32))
        v = groups / scale
        q = _nearest_e2m1(v) if scheme == "mxfp4" else v.clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32)
    return (q * scale).reshape(w.shape)


ASYMMETRIC = {"int4-asym": 4, "int8-asym": 8}


def _fake_asymmetric(w: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Per 128 inputs, every step in the weight's dtype: the range [min, max] widened to hold 0, scale = range /
    (2^bits - 1), integer zero point = round(clamp(qmin - min / scale)) (0 for an all-zero group), codes =
    round(clamp(w / scale + zero)), back to (code - zero) * scale."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    tiles, (out, inp) = _tiles(w, 1, 128)
    t = tiles.to(dtype)
    low, high = t.amin(dim=3, keepdim=True).clamp(max=0), t.amax(dim=3, keepdim=True).clamp(min=0)
    scale = (high - low) / torch.tensor(float(qmax - qmin), dtype=dtype)
    zero = (qmin - low / scale).clamp(qmin, qmax).nan_to_num(0.0).round()
    scale = torch.where(scale > 0, scale, torch.finfo(dtype).eps)
    q = (t / scale + zero).clamp(qmin, qmax).round()
    return ((q - zero) * scale).to(torch.float32).reshape(tiles.shape[0], -1)[:out, :inp]


def _fake(weight: torch.Tensor, scheme: str, dtype: torch.dtype, shared_amax: torch.Tensor | None) -> torch.Tensor:
    """Quantize and dequantize one [out, in] weight the way each scheme's spec says (FORMAT.md)."""
    if scheme in MICROSCALED:
        return _fake_microscaled(weight, scheme, shared_amax)
    w = weight.to(torch.float32)
    if scheme in ASYMMETRIC:
        return _fake_asymmetric(w, ASYMMETRIC[scheme], dtype)
    is_fp8 = scheme.startswith("fp8")
    bits = 4 if scheme == "rtn4" else 8
    divisor = 448.0 if is_fp8 else (2**bits - 1) / 2
    rows, cols = {"rtn4": (1, 128), "rtn8": (1, 128), "int8-block": (128, 128), "w8a8-int8": (1, w.shape[1]),
                  "fp8": (1, w.shape[1]), "fp8-block": (128, 128), "fp8-tensor": w.shape}[scheme]
    tiles, (out, inp) = _tiles(w, rows, cols)
    amax = tiles.abs().amax(dim=(1, 3), keepdim=True) if shared_amax is None else shared_amax.reshape(1, 1, 1, 1)
    scale = (amax / divisor).to(dtype).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.finfo(dtype).eps)
    q = (tiles.to(dtype) / scale.to(dtype)).to(torch.float32)
    if is_fp8:
        q = q.clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32)
    else:
        q = q.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).round()
    return (q * scale).reshape(tiles.shape[0] * rows, -1)[:out, :inp]


def fake_quantize_checkpoint(src: Path, dst: Path, modules: set[str], scheme: str, mla: bool) -> None:
    """A float32 copy of ``src`` whose ``modules`` hold their fake-quantized weights."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(file))
    dtype = next(t.dtype for n, t in tensors.items() if n.removesuffix(".weight") in modules)
    shared: dict[str, torch.Tensor] = {}
    if scheme in ("fp8-tensor", "nvfp4"):  # one amax for each fused matrix
        for module in modules:
            key = _fused_key(module, mla)
            amax = tensors[f"{module}.weight"].abs().amax()
            shared[key] = torch.maximum(shared.get(key, amax), amax)
    out = {}
    for name, tensor in tensors.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in modules:
            amax = shared.get(_fused_key(module, mla)) if scheme in ("fp8-tensor", "nvfp4") else None
            out[name] = _fake(tensor, scheme, dtype, amax)
        else:
            out[name] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config))


# ---------------------------------------------------------------- checkpoints and models

def build_checkpoint(case: ArchCase, root: Path) -> Path:
    """The case's tiny random model, seeded, saved as transformers saves it (bf16, 1 or 2 shards)."""
    folder = root / f"{case.name}-bf16"
    if folder.exists():
        return folder
    torch.manual_seed(SEED)
    config = transformers.AutoConfig.for_model(case.model_type, **case.config)
    model = getattr(transformers, case.auto).from_config(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:  # norms and biases away from their initial 1/0, so they matter
                param.add_(0.05 * torch.randn_like(param))
            elif re.search(r"(gate|router)\.weight$", name) and param.shape[0] == EXPERTS:
                # Decisive routing: a random tiny router sits near ties, where the rounding
                # differences between two correct dequantizations flip experts.
                param.mul_(20)
    shard = "300KB" if case.shards > 1 else "1GB"
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


def model_inputs(case: ArchCase) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(3, 200, (2, 12), generator=generator)
    if case.inputs == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :6]}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def load(folder: Path, case: ArchCase, dtype: torch.dtype = torch.float32, **kwargs) -> tuple[torch.nn.Module, dict]:
    model, info = getattr(transformers, case.auto).from_pretrained(
        folder, dtype=dtype, output_loading_info=True, **kwargs)
    return model.eval(), info


def logits(model: torch.nn.Module, case: ArchCase) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(case)).logits.to(torch.float32)


_ORIGINAL: dict[str, torch.Tensor] = {}


def original_logits(case: ArchCase, source: Path) -> torch.Tensor:
    if case.name not in _ORIGINAL:
        _ORIGINAL[case.name] = logits(load(source, case)[0], case)
    return _ORIGINAL[case.name]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="session")
def arch_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("arch")


def _params() -> list:
    params = []
    for case in CASES:
        for scheme in case.schemes:
            marks = [] if case.fast and scheme in FAST else [pytest.mark.arch]
            params.append(pytest.param(case, scheme, id=f"{case.name}-{scheme}", marks=marks))
    return params


def run_quantize(case: ArchCase, source: Path, scheme: str, output: Path | None, **extra) -> tuple[dict, list[str]]:
    notes: list[str] = []
    request = QuantizeRequest(model=str(source), scheme=get_scheme(scheme), output=output, dry_run=output is None,
                              show_progress=False, overwrite=True, **{**case.request, **extra})
    return quantize(request, notes.append), notes


# ---------------------------------------------------------------- the matrix

@pytest.mark.parametrize(("case", "scheme"), _params())
def test_architecture(case: ArchCase, scheme: str, arch_root: Path) -> None:
    source = build_checkpoint(case, arch_root)

    # The plan (dry run): exactly the expected modules, every expected skip for its reason.
    plan, _ = run_quantize(case, source, scheme, None)
    planned = {layer["module"] for layer in plan["layers"]}
    assert planned == case.expected_modules, (sorted(planned - case.expected_modules),
                                              sorted(case.expected_modules - planned))
    reasons = {s["module"]: s["reason"] for s in plan["skipped"]}
    for module, word in case.expected_skipped.items():
        assert word.lower() in reasons[module].lower(), (module, reasons.get(module))
    assert plan["coverage"]["share"] is not None

    # No weight along the wrong axis: each quantized nn.Linear is quantized as its [out, in].
    with torch.device("meta"):
        skeleton = getattr(transformers, case.auto).from_config(transformers.AutoConfig.from_pretrained(source))
    for layer in plan["layers"]:
        try:
            module = skeleton.get_submodule(layer["module"])
        except AttributeError:
            continue  # per-expert weights, fused into 3-D parameters by transformers at load
        if isinstance(module, torch.nn.Linear):
            assert layer["shape"] == [module.out_features, module.in_features], layer["module"]
    del skeleton

    output = arch_root / f"{case.name}-{scheme}"
    run_quantize(case, source, scheme, output)
    if case.experts_split:
        check_split_experts(case, source, output, scheme)
        shutil.rmtree(output)
        return
    reference_dir = arch_root / f"{case.name}-{scheme}-fake"
    fake_quantize_checkpoint(source, reference_dir, case.expected_modules, scheme, mla=case.model_type == "deepseek_v3")

    original = original_logits(case, source)
    reference = logits(load(reference_dir, case)[0], case)
    quant_error = rel(original, reference)
    assert quant_error > 0  # the fake quantization changed something

    for kwargs in ({}, {"quantization_config": CompressedTensorsConfig(dequantize=True)}):
        if not kwargs and scheme in case.compressed_path_fails:
            with pytest.raises(AttributeError, match="weight"):
                load(output, case)[0](**model_inputs(case))
            continue
        refused = case.transformers_refuses.get(scheme, {}).get("dequantize" if kwargs else "compressed")
        if refused:
            with pytest.raises(RuntimeError, match=refused):
                load(output, case, **kwargs)
            continue
        if scheme in case.transformers_wrong:
            # transformers computes these wrongly on either path, on llm-compressor's bytes too (asserted, so that a
            # fix shows up here); vLLM's loaders check them (make engines).
            got = logits(load(output, case, torch.bfloat16 if not kwargs else torch.float32, **kwargs)[0], case)
            assert rel(got, reference) > 0.5, (kwargs, rel(got, reference))
            continue
        # compressed-tensors runs NVFP4/MX layers compressed in bf16 only (it decompresses them to bf16): the
        # compressed path is loaded in bf16 and its logits compared in float32.
        dtype = torch.bfloat16 if scheme in MICROSCALED and not kwargs else torch.float32
        model, info = load(output, case, dtype, **kwargs)
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            assert not info.get(key), (key, sorted(info[key])[:5])
        got = logits(model, case)
        # The dequantize path rounds dequantized weights to the scale dtype (bf16): ~0.3% in the
        # logits. Activation quantization (dynamic schemes, compressed path) adds its own error on
        # top, and MoE routing can flip on such differences. A weight quantized along the wrong
        # axis or read as raw codes is off by tens of %.
        allowed = 0.25 * quant_error + 5e-3
        if scheme not in ("rtn4", "rtn8") and not kwargs:
            allowed = 1.0 * quant_error + 5e-3
        assert rel(got, reference) <= allowed, (kwargs, rel(got, reference), quant_error)
    shutil.rmtree(output)
    shutil.rmtree(reference_dir)


# ---------------------------------------------------------------- 3-D experts written per expert

# Each architecture's per-expert [out, in] weights, cut from its stored 3-D tensors as transformers' modeling
# code applies them (written here, not taken from qconvert): GraniteMoeParallelExperts hold [experts, out, in]
# and GraniteMoeMoE chunks input_linear's output into gate (first half) and up; GptOssExperts compute
# x @ gate_up_proj[e] ([in, 2 x inter]; gate in the even columns, up in the odd ones) and x @ down_proj[e],
# and vLLM's gpt-oss w13 keeps that interleaved order in its rows.
EXPERT_CUTS = {
    "granitemoe": {
        "gate_proj": ("block_sparse_moe.input_linear.weight", lambda w: w[: w.shape[0] // 2]),
        "up_proj": ("block_sparse_moe.input_linear.weight", lambda w: w[w.shape[0] // 2:]),
        "down_proj": ("block_sparse_moe.output_linear.weight", lambda w: w),
    },
    "gpt_oss": {
        "w13": ("mlp.experts.gate_up_proj", lambda w: w.t()),
        "w2": ("mlp.experts.down_proj", lambda w: w.t()),
    },
}


def _dequantized(tensors: dict[str, torch.Tensor], module: str, scheme: str, shape: tuple[int, int]) -> torch.Tensor:
    """A written layer's weight, dequantized with compressed-tensors' own unpacking and a plain scale expansion
    (``{module}.weight_scale``, or vLLM's per-expert spelling ``{module}_weight_scale``)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    def get(leaf: str) -> torch.Tensor | None:
        return tensors.get(f"{module}.{leaf}", tensors.get(f"{module}_{leaf}"))

    packed, scale = get("weight_packed"), get("weight_scale").float()
    if scheme in MICROSCALED:
        from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

        if packed is not None:
            values = unpack_fp4_from_uint8(packed, shape[0], shape[1], dtype=torch.float32)
        else:
            values = get("weight").float()
        if scheme == "nvfp4":
            scale = get("weight_scale").float() / get("weight_global_scale").float()
        else:
            scale = torch.exp2(get("weight_scale").float() - 127)
        return values * scale.repeat_interleave(shape[1] // scale.shape[1], 1)
    if packed is not None:
        values = unpack_from_int32(packed, 4 if scheme == "rtn4" else 8, torch.Size(shape)).float()
    else:
        values = get("weight").float()
    assert tuple(values.shape) == shape, (module, tuple(values.shape), shape)
    if scale.numel() > 1:
        rows, cols = -(-shape[0] // scale.shape[0]), -(-shape[1] // scale.shape[1])
        scale = scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[: shape[0], : shape[1]]
    return values * scale


def check_split_experts(case: ArchCase, source: Path, output: Path, scheme: str) -> None:
    """Every per-expert layer equals the independent fake quantization of its independent cut; transformers
    (which the serving table says cannot load these outputs) does refuse them."""
    stored: dict[str, torch.Tensor] = {}
    for file in sorted(source.glob("*.safetensors")):
        stored.update(load_file(file))
    written: dict[str, torch.Tensor] = {}
    for file in sorted(output.glob("*.safetensors")):
        written.update(load_file(file))
    checked = 0
    for module in sorted(m for m in case.expected_modules if ".experts." in m):
        layer_prefix, _, rest = module.partition(".block_sparse_moe.experts." if "block_sparse_moe" in module
                                                 else ".mlp.experts.")
        expert, _, leaf = rest.partition(".")
        tensor_name, cut = EXPERT_CUTS[case.model_type][leaf]
        weight = cut(stored[f"{layer_prefix}.{tensor_name}"][int(expert)])
        shared = None
        if scheme in ("nvfp4", "fp8-tensor") and leaf in ("gate_proj", "up_proj"):  # one value for fused gate/up
            parts = [EXPERT_CUTS[case.model_type][p] for p in ("gate_proj", "up_proj")]
            shared = torch.stack([c(stored[f"{layer_prefix}.{t}"][int(expert)]).abs().amax() for t, c in parts]).max()
        reference = _fake(weight, scheme, weight.dtype, shared)
        got = _dequantized(written, module, scheme, tuple(weight.shape))
        assert rel(got, reference) < 1e-2, (module, rel(got, reference))
        checked += 1
    assert checked == LAYERS_EXPERTS_PARTS[case.model_type]
    if case.model_type == "granitemoe":  # compressed-tensors modules: qconvert verify checks them (serving table)
        from qconvert.verification import verify

        report = verify(str(output), device=torch.device("cpu"), tokens=[1],
                        layers=r"layers\.1\.block_sparse_moe\.experts\.3\.(gate|down)_proj$")
        assert len(report.layers) == 2 and report.ok, [(r.module, r.notes) for r in report.layers]
    try:
        _, info = load(output, case)
    except Exception as error:  # any refusal is what the table says
        refusal = f"{type(error).__name__}: {error}"
    else:
        refusal = sorted(k for key in ("unexpected_keys", "missing_keys") for k in info.get(key, []) if "expert" in k)
    assert refusal, "transformers loads per-expert experts now: update qconvert.serving (SPLIT_FAMILIES)"


LAYERS_EXPERTS_PARTS = {"granitemoe": 2 * EXPERTS * 3, "gpt_oss": 2 * EXPERTS * 2}


# ---------------------------------------------------------------- what the matrix cannot say by itself

def _case(name: str) -> ArchCase:
    return next(case for case in CASES if case.name == name)


def _one_line_error(result) -> str:
    assert result.code == 2, (result.code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_gpt2_conv1d_is_never_quantized_and_says_why(arch_root: Path) -> None:
    case = _case("gpt2")
    source = build_checkpoint(case, arch_root)
    line = _one_line_error(run_cli("quantize", source, "--scheme", "rtn4", "--dry-run"))
    assert "no tensor to quantize" in line and "Conv1D weight stored [in, out]" in line, line
    for extra in ({"ignore": ["re:.*c_attn", "re:.*c_proj"]}, {"targets": ["re:.*c_fc"]}, {}):
        for scheme in ("rtn4", "fp8-tensor"):
            with pytest.raises(BadInputError) as caught:
                run_quantize(case, source, scheme, None, **extra)
            message = str(caught.value)
            assert "every candidate was skipped" not in message
            assert "Conv1D" in message and ("--ignore" in message or not extra.get("ignore")), message


def test_verify_refuses_a_transposed_layer_in_one_line(arch_root: Path, tmp_path: Path) -> None:
    """A GPT-2 quantized as if its Conv1D weights were [out, in] (as qconvert once did)."""
    source = build_checkpoint(_case("gpt2"), arch_root)
    blind = tmp_path / "gpt2-no-architecture"
    shutil.copytree(source, blind)
    config = json.loads((blind / "config.json").read_text())
    (blind / "config.json").write_text(json.dumps({"hidden_size": config["n_embd"]}))  # planning cannot tell
    out = tmp_path / "gpt2-rtn4"
    run_quantize(_case("llama"), blind, "rtn4", out)
    written = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": written["quantization_config"]}))
    line = _one_line_error(run_cli("verify", out, "--device", "cpu"))
    assert "stored [in, out]" in line and any(leaf in line for leaf in ("c_attn", "c_proj", "c_fc")), line


def test_fused_3d_experts_are_written_per_expert_or_refused_with_a_way_out(arch_root: Path) -> None:
    gpt_oss = build_checkpoint(_case("gpt_oss"), arch_root)
    line = _one_line_error(run_cli("quantize", gpt_oss, "--scheme", "fp8", "--dry-run"))
    assert "3-D fused expert tensors" in line and "rtn4/rtn8" in line and "--keep-fused-experts" in line, line
    with pytest.raises(BadInputError, match=r"3-D fused expert tensors.*--keep-fused-experts"):
        run_quantize(_case("gpt_oss"), gpt_oss, "fp8-block", None, targets=[r"re:.*experts.*"])
    for name in ("gpt_oss", "granitemoe"):
        source = build_checkpoint(_case(name), arch_root)
        summary, notes = run_quantize(_case(name), source, "rtn4", None)
        assert summary["coverage"]["share"] >= 0.9 and summary["coverage"]["by_kind"]["experts"]["share"] == 1
        assert any("as one quantized layer per expert" in note and "transformers" in note for note in notes), notes
        engines = [s["engine"] for s in summary["serves_in"]]
        assert engines == (["vllm"] if name == "gpt_oss" else ["vllm", "qconvert"]), engines  # no transformers
        kept, notes = run_quantize(_case(f"{name}-kept"), source, "rtn4", None)
        experts = [s for s in kept["skipped"] if s["kind"] == "experts"]
        assert len(experts) == 4 and all("--keep-fused-experts" in s["reason"] for s in experts)
        assert kept["coverage"]["by_kind"]["experts"]["share"] == 0
        assert kept["coverage"]["by_kind"]["attention"]["share"] == 1
        assert any("3-D fused experts" in note for note in notes)  # said, not only in the JSON
        assert any(note.startswith("note: coverage ") for note in notes)
        assert "transformers" in [s["engine"] for s in kept["serves_in"]]


def test_min_coverage_fails_at_plan_time(arch_root: Path) -> None:
    source = build_checkpoint(_case("gpt_oss"), arch_root)
    line = _one_line_error(run_cli("quantize", source, "--scheme", "rtn4", "--dry-run", "--keep-fused-experts",
                                   "--min-coverage", "0.9"))
    assert "below --min-coverage 90.0%" in line and "experts 0.0%" in line, line
    summary, _ = run_quantize(_case("llama"), build_checkpoint(_case("llama"), arch_root), "rtn4", None,
                              min_coverage=0.9)
    assert summary["coverage"]["share"] == 1


def test_fp8_tensor_scales_follow_the_architectures_fusions(arch_root: Path) -> None:
    """DeepSeek MLA: q_a_proj + kv_a_proj_with_mqa (vLLM's fused_qkv_a_proj) and shared_experts
    gate/up share one scale; --fuse still replaces the map."""
    case = _case("deepseek_v3")
    source = build_checkpoint(case, arch_root)

    def scales(folder: Path) -> dict[str, float]:
        found = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(file, "pt") as f:
                found.update({k.removesuffix(".weight_scale"): f.get_tensor(k).item()
                              for k in f.keys() if k.endswith(".weight_scale")})
        return found

    out = arch_root / "deepseek-fp8-tensor-fusions"
    run_quantize(case, source, "fp8-tensor", out)
    got = scales(out)
    for i in range(2):
        attn = f"model.layers.{i}.self_attn"
        assert got[f"{attn}.q_a_proj"] == got[f"{attn}.kv_a_proj_with_mqa"] != got[f"{attn}.q_b_proj"]
    shared = "model.layers.1.mlp.shared_experts"
    assert got[f"{shared}.gate_proj"] == got[f"{shared}.up_proj"] != got[f"{shared}.down_proj"]
    assert got["model.layers.0.mlp.gate_proj"] == got["model.layers.0.mlp.up_proj"]
    run_quantize(case, source, "fp8-tensor", out, fused_patterns=[r"^(.*\.mlp)\.(?:gate_proj|up_proj)$"])
    got = scales(out)
    assert got["model.layers.0.self_attn.q_a_proj"] != got["model.layers.0.self_attn.kv_a_proj_with_mqa"]
    shutil.rmtree(out)


def _renamed_qwen2_vl(source: Path, dst: Path) -> Path:
    """A Qwen2-VL checkpoint under transformers 5's module names (``model.visual.*``,
    ``model.language_model.layers.*``); the matrix covers the hub names (``visual.*``, ``model.layers.*``)."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for file in source.glob("*.safetensors"):
        tensors.update(load_file(file))
    renamed = {re.sub(r"^visual\.", "model.visual.", re.sub(r"^model\.", "model.language_model.", k)): v
               for k, v in tensors.items()}
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(source / "config.json", dst / "config.json")
    return dst


def test_vision_ignore_entries_survive_the_loaders_renames(arch_root: Path) -> None:
    case = _case("qwen2_vl")
    source = build_checkpoint(case, arch_root)
    renamed = _renamed_qwen2_vl(source, arch_root / "qwen2_vl-renamed")
    out = arch_root / "qwen2_vl-renamed-rtn4"
    summary, notes = run_quantize(case, renamed, "rtn4", out)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    pattern = next(p for p in ignore if "visual" in p)
    for spelling in ("visual.blocks.0.attn.qkv", "model.visual.blocks.0.attn.qkv"):
        assert re.match(pattern.removeprefix("re:"), spelling)
    assert not re.match(pattern.removeprefix("re:"), "model.language_model.layers.0.mlp.up_proj")
    assert any("vision" in note and "--include-vision" in note for note in notes)
    assert summary["coverage"]["by_kind"]["vision"]["share"] == 0
    reference_dir = arch_root / "qwen2_vl-renamed-fake"
    modules = {m.replace("model.", "model.language_model.", 1) for m in case.expected_modules}
    assert {layer["module"] for layer in summary["layers"]} == modules
    fake_quantize_checkpoint(renamed, reference_dir, modules, "rtn4", mla=False)
    reference = logits(load(reference_dir, case)[0], case)
    for kwargs in ({}, {"quantization_config": CompressedTensorsConfig(dequantize=True)}):
        model, info = load(out, case, **kwargs)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert rel(logits(model, case), reference) < 5e-3

    # --include-vision quantizes the tower's linear layers too, and that loads as well.
    included, _ = run_quantize(case, source, "rtn4", out, include_vision=True)
    planned = {layer["module"] for layer in included["layers"]}
    assert {"visual.blocks.0.attn.qkv", "visual.blocks.0.mlp.fc1"} <= planned
    model, info = load(out, case)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    shutil.rmtree(out)


def test_refusals_come_before_any_output(arch_root: Path, tmp_path: Path) -> None:
    source = build_checkpoint(_case("gpt_oss"), arch_root)
    with pytest.raises(BadInputError, match="--keep-fused-experts"):
        run_quantize(_case("llama"), source, "fp8", tmp_path / "out")  # gpt-oss experts: rtn4/rtn8 only
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_verify_names_the_per_expert_tensors_it_cannot_check(arch_root: Path, tmp_path: Path) -> None:
    """gpt-oss experts in vLLM's spelling are no compressed-tensors layer: verify says so instead of passing
    over them in silence."""
    from qconvert.verification import verify

    out = tmp_path / "gpt_oss-rtn4"
    run_quantize(_case("gpt_oss"), build_checkpoint(_case("gpt_oss"), arch_root), "rtn4", out)
    report = verify(str(out), device=torch.device("cpu"), tokens=[1], layers=r"layers\.0\.self_attn\.o_proj$")
    assert report.ok and len(report.layers) == 1
    assert len(report.not_verified) == 2 * EXPERTS * 2  # layers x experts x (w13, w2)
    assert all(name.endswith(("w13_weight_packed", "w2_weight_packed")) for name in report.not_verified)
    assert report.to_json()["not_verified"] == report.not_verified


def test_per_expert_layers_with_partial_blocks_are_not_claimed_for_vllm(arch_root: Path) -> None:
    """A per-expert layer that is not whole 128x128 blocks (here GraniteMoE with an intermediate size of 192)
    is reported as vLLM reports such layers: not served (a note, and nothing in serves_in)."""
    case = _case("granitemoe")
    narrow = replace(case, name="granitemoe-i192", config={**case.config, "intermediate_size": 192,
                                                           "num_key_value_heads": 4})
    summary, notes = run_quantize(narrow, build_checkpoint(narrow, arch_root), "fp8-block", None)
    assert [s["engine"] for s in summary["serves_in"]] == ["qconvert"], summary["serves_in"]  # not vLLM/SGLang
    assert any("experts.0.gate_proj [192, 128] is not whole 128x128 blocks" in note for note in notes), notes
