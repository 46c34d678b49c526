"""SGLang conformance: every output kind qconvert writes, through SGLang 0.5.23's own config parsing, model
classes and weight loaders (see sglang_harness.py for exactly what runs and what is patched).

Run with the engine venv (``make engines``; tests/engines/setup_sglang.sh builds it). Without SGLang importable,
the module skips, so the default tier stays as it was.

Per case and GPU capability (75, 80, 89, 90): the scheme SGLang picks per layer kind; every tensor through the
real model's ``load_weights``, each parameter the picked methods created compared with the files on disk
(nothing left at its initial fill, nothing on disk dropped, no shape/dtype error); and the outcome against
``qconvert.serving`` (loaded at c  <=>  the table lists SGLang for the kind and family with min_capability <= c;
the picks equal the table's ``method`` / ``moe_method``). NVFP4 cases also run SGLang's post-load processing up to
the GPU repacking and compare the weights it keeps with the checkpoint (``sglang_harness.check_microscaled``), on
a Qwen3-MoE as well (family "llama" in the table).
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.engines import sglang_harness as harness

try:
    harness.import_sglang()
except Exception as exc:
    pytest.skip(f"SGLang {harness.VERSION} is not importable here ({type(exc).__name__}: {exc}); "
                "run tests/engines/setup_sglang.sh and use its python", allow_module_level=True)

from qconvert import serving
from qconvert.cli import main as qconvert_main
from tests.engines.sources import build_qwen3_moe_source, build_sglang_source

CAPABILITIES = (75, 80, 89, 90)
# Layer kinds whose pick is the table's linear `method` (lm_head stays unquantized; experts: `moe_method`).
NOT_LINEAR = {"lm_head", "experts"}


@dataclass(frozen=True)
class Case:
    kind: str  # output kind (qconvert.serving.output_kind)
    quantize: tuple[str, ...]  # qconvert quantize arguments
    convert: str | None = None  # then qconvert convert --op
    plain_mlp: bool = False  # the MLP layers (dense, shared experts, experts) are left unquantized
    families: tuple[str, ...] = ("llama", "deepseek")  # the source models it runs on (FAMILIES)


CASES = [
    Case("rtn4", ("--scheme", "rtn4")),
    Case("rtn8", ("--scheme", "rtn8")),
    # Zero points (W4A16_ASYM / W8A16_ASYM). MoE experts with zero points: test_sglang_fails_moe_zero_points.
    Case("int4-asym", ("--scheme", "int4-asym")),
    Case("int8-asym", ("--scheme", "int8-asym")),
    Case("int8-block", ("--scheme", "int8-block")),
    Case("w8a8-int8", ("--scheme", "w8a8-int8")),
    Case("fp8", ("--scheme", "fp8")),
    Case("fp8-block", ("--scheme", "fp8-block")),
    Case("fp8-tensor", ("--scheme", "fp8-tensor")),
    Case("int8-block@sglang", ("--scheme", "int8-block", "--layout", "sglang")),
    # What qconvert refuses for Llama without --force-layout: SGLang's own loader, run on the forced output.
    Case("int8-block@sglang", ("--scheme", "int8-block", "--layout", "sglang", "--force-layout")),
    Case("w8a8-int8+pack", ("--scheme", "w8a8-int8"), "pack"),
    Case("int8-block+pack", ("--scheme", "int8-block"), "pack"),
    Case("fp8+fnuz", ("--scheme", "fp8"), "fnuz"),
    Case("fp8-block+fnuz", ("--scheme", "fp8-block"), "fnuz"),
    Case("fp8-tensor+fnuz", ("--scheme", "fp8-tensor"), "fnuz"),
    # Per-layer scales (a --fuse pattern that matches nothing): SGLang requantizes fused layers itself ...
    Case("fp8-tensor", ("--scheme", "fp8-tensor", "--fuse", "^(NOMATCH)$")),
    # ... or shared by the convert op.
    Case("fp8-tensor+shared-scale", ("--scheme", "fp8-tensor", "--fuse", "^(NOMATCH)$"), "shared-scale"),
    Case("fp8-block+dequantize", ("--scheme", "fp8-block"), "dequantize"),
    Case("mixed", ("--scheme", "fp8-block", "--override", "re:.*mlp.*=rtn4")),
    # An override to `none` leaves one quantized scheme: its kind is that scheme's.
    Case("fp8-block", ("--scheme", "fp8-block", "--override", "re:.*mlp.*=none"), plain_mlp=True),
    # Microscaled, weight-only. NVFP4 also on a Qwen3-MoE: SGLang's NVFP4 weight-only MoE scheme refuses experts
    # whose gate and up global scales differ (sglang_harness.check_microscaled runs its post-load checks), and
    # DeepSeek is the tier's only other MoE model.
    Case("nvfp4", ("--scheme", "nvfp4"), families=("llama", "deepseek", "qwen3_moe")),
    Case("mxfp4", ("--scheme", "mxfp4")),
    Case("mxfp8", ("--scheme", "mxfp8")),
]
CASE_IDS = [c.kind + ("-mlp-none" if "re:.*mlp.*=none" in c.quantize else "")
            + ("-forced" if "--force-layout" in c.quantize else "")
            + ("-unshared" if "--fuse" in c.quantize and not c.convert else "") for c in CASES]
# Kinds a checkpoint holds layers of (a mixed-precision output is served where every one of them is).
MIXED_KINDS = {"mixed": ["fp8-block", "rtn4"]}
FAMILIES = ("llama", "deepseek", "qwen3_moe")
# The table's family for each source model (qconvert.serving.family_of: every non-DeepSeek decoder is "llama").
TABLE_FAMILY = {"qwen3_moe": "llama"}

# Cases where SGLang and the table disagree because qconvert's output is wrong (being fixed on main):
# strict xfail with the engine's exact message. Keyed by (case id, family).
KNOWN_QCONVERT_DEFECTS: dict[tuple[str, str], str] = {
    # (Fixed: a mixed config now targets "Linear" with its largest group, from which SGLang takes the block
    # size of fused layers' scales; it used to name every layer and SGLang read a block size of None.)
}

RESULTS: list[harness.Result] = []


class KnownQconvertDefect(AssertionError):
    """Raised (and expected by a strict xfail) only when SGLang fails with exactly the recorded message."""


def _qconvert(*args: str | Path) -> tuple[int, str]:
    """Run the qconvert CLI in-process; (exit code, stderr)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            qconvert_main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
    return code, stderr.getvalue()


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {"llama": build_sglang_source("llama", root / "llama"),
            "deepseek": build_sglang_source("deepseek", root / "deepseek"),
            "qwen3_moe": build_qwen3_moe_source(root / "qwen3_moe")}


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest):
    yield
    if RESULTS:
        path = harness.write_report(RESULTS)
        text = f"\n{harness.markdown_table(RESULTS)}\nwrote {path}\n"
        # Past pytest's output capture: the table is part of what `make engines` shows.
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(text)


def _build(case: Case, base: Path, out: Path) -> tuple[Path | None, str]:
    first = out / "q" if case.convert else out / "out"
    code, err = _qconvert("quantize", base, *case.quantize, "-o", first, "--quiet", "--overwrite")
    if code == 0 and case.convert:
        code, err = _qconvert("convert", first, "--op", case.convert, "-o", out / "out", "--quiet", "--overwrite")
    if code != 0:
        line = next((ln for ln in err.splitlines() if ln.startswith("error")), err.strip()[:200])
        return None, line
    return out / "out", ""


def _reference(checkpoint: Path, out: Path) -> Path | None:
    """qconvert's own dequantization of ``checkpoint``, in the model's dtype."""
    code, _ = _qconvert("convert", checkpoint, "--op", "dequantize", "-o", out, "--quiet", "--overwrite")
    return out if code == 0 else None


def _expected(kind: str, family: str, capability: int) -> serving.Serving | None:
    if kind.endswith("+dequantize"):
        # A dequantized output has no quantization_config: a plain checkpoint, which the table does not list.
        return serving.Serving(serving.Engine.SGLANG, harness.VERSION, "UnquantizedLinearMethod", None,
                               moe_method="UnquantizedFusedMoEMethod")
    if kind in MIXED_KINDS:
        # serves_in gives one entry per method, each from its capability up: the GPU's is the last it meets.
        chosen = [s for s in serving.serves_in(MIXED_KINDS[kind], family) if s.engine == serving.Engine.SGLANG
                  and (s.min_capability or 0) <= capability][-1:]
        if not chosen:
            return None
        return serving.Serving(chosen[0].engine, chosen[0].version, "|".join(
            sorted(chosen[0].method.split(" + "))), chosen[0].min_capability, moe_method=chosen[0].moe_method)
    return serving.pick(kind, serving.Engine.SGLANG, capability, family)


MLP_KINDS = {"gate_up", "down", "shared_gate_up", "shared_down", "experts"}


def _disagreements(result: harness.Result, case: Case) -> list[str]:
    expected = _expected(result.kind, TABLE_FAMILY.get(result.family, result.family), result.capability)
    lines = []
    if result.loaded != (expected is not None):
        lines.append(f"sm{result.capability}: SGLang {'loaded' if result.loaded else 'did not load'} it, the "
                     f"table says {'it does' if expected else 'it does not'}"
                     + ("" if result.loaded else f" ({'; '.join(result.problems[:3])})"))
    if expected is not None and result.loaded:
        picks = dict(result.picks)
        if case.plain_mlp:  # ignored layers: SGLang's unquantized methods, the rest as the table says
            plain = {k: picks.pop(k) for k in list(picks) if k in MLP_KINDS}
            wanted = {k: "UnquantizedFusedMoEMethod" if k == "experts" else "UnquantizedLinearMethod" for k in plain}
            if plain != wanted:
                lines.append(f"sm{result.capability}: SGLang picked {plain} for the ignored MLP layers")
        linear = "|".join(sorted({p for k, v in picks.items() if k not in NOT_LINEAR for p in v.split("|")}))
        if linear != expected.method:
            lines.append(f"sm{result.capability}: SGLang picked {linear} for linear layers, the table says "
                         f"{expected.method}")
        if result.postload.startswith("0 layers compared") and "not run on a CPU" not in result.postload:
            lines.append(f"sm{result.capability}: the post-load comparison compared nothing ({result.postload})")
        if "experts" in picks and picks["experts"] != expected.moe_method:
            lines.append(f"sm{result.capability}: SGLang picked {result.picks['experts']} for MoE experts, the "
                         f"table says {expected.moe_method}")
    return lines


PARAMS = [pytest.param(case, family, id=f"{family}-{cid}",
                       marks=[pytest.mark.xfail(strict=True, raises=KnownQconvertDefect,
                                                reason=KNOWN_QCONVERT_DEFECTS[(cid, family)])]
                       if (cid, family) in KNOWN_QCONVERT_DEFECTS else [])
          for family in FAMILIES for case, cid in zip(CASES, CASE_IDS, strict=True) if family in case.families]


@pytest.mark.parametrize(("case", "family"), PARAMS)
def test_sglang_loads_as_the_table_says(case: Case, family: str, bases: dict[str, Path], tmp_path: Path,
                                        request: pytest.FixtureRequest) -> None:
    checkpoint, refusal = _build(case, bases[family], tmp_path)
    reference = _reference(checkpoint, tmp_path / "dequantized") if checkpoint and case.convert != "dequantize" \
        else None
    results = []
    for capability in CAPABILITIES:
        if checkpoint is None:
            result = harness.Result(harness.ENGINE, harness.VERSION, family, case.kind, capability,
                                    problems=[f"qconvert refused to write it: {refusal}"])
        else:
            result = harness.run_case(checkpoint, family, case.kind, capability, reference)
        result.case = request.node.callspec.id
        results.append(result)
    RESULTS.extend(results)
    for r in results:
        print(f"{family} {case.kind} sm{r.capability}: loaded={r.loaded} picks={json.dumps(r.picks)} {r.postload}")
        for problem in r.problems[:6]:
            print(f"    {problem}")
    problems = [line for r in results for line in _disagreements(r, case)]
    known = KNOWN_QCONVERT_DEFECTS.get((request.node.callspec.id.split("-", 1)[1], family))
    if problems and known and all(known in line for line in problems):
        raise KnownQconvertDefect(f"{family} {case.kind}: " + "\n".join(problems))
    assert not problems, f"{family} {case.kind}:\n" + "\n".join(problems)


def test_loaded_means_every_parameter_matches_the_disk(bases: dict[str, Path], tmp_path: Path) -> None:
    """The check can fail: a scale renamed after writing (so SGLang's loader has nowhere to put it) is
    reported twice, by name: the parameter never written and the tensor on disk nothing holds."""
    from safetensors.torch import load_file, save_file

    checkpoint, _ = _build(Case("fp8-block", ("--scheme", "fp8-block")), bases["llama"], tmp_path)
    assert checkpoint is not None
    shard = next(checkpoint.glob("*.safetensors"))
    tensors = load_file(shard)
    name = "model.layers.1.mlp.down_proj.weight_scale"
    tensors[name + "_renamed"] = tensors.pop(name)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = checkpoint / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"][name + "_renamed"] = data["weight_map"].pop(name)
        index.write_text(json.dumps(data))
    result = harness.run_case(checkpoint, "llama", "fp8-block", 90)
    assert not result.loaded
    assert any(p.startswith(f"{name}:") and "never loaded" in p for p in result.problems), result.problems
    assert any(p.startswith(f"{name}_renamed: on disk but no SGLang parameter") for p in result.problems), \
        result.problems


def test_packed_dynamic_int8_is_what_sglang_cannot_load(bases: dict[str, Path], tmp_path: Path) -> None:
    """Why `convert --op pack` refuses dynamic-activation int8 (w8a8-int8): packed by hand the way pack would
    write it (pack-quantized, weight_packed + weight_shape, activations kept), SGLang picks its W8A8 method,
    whose `weight` parameter nothing fills, and drops every `weight_packed`."""
    from safetensors.torch import load_file, save_file

    from qconvert.quantizers import pack_int32

    checkpoint, _ = _build(Case("w8a8-int8", ("--scheme", "w8a8-int8")), bases["llama"], tmp_path)
    assert checkpoint is not None
    shard = next(checkpoint.glob("*.safetensors"))
    tensors = load_file(shard)
    for name in [n for n, t in tensors.items() if n.endswith(".weight") and t.dtype == torch.int8]:
        codes = tensors.pop(name)
        tensors[name + "_packed"] = pack_int32(codes, 8)
        tensors[name + "_shape"] = torch.tensor(codes.shape, dtype=torch.int64)
    save_file(tensors, shard, metadata={"format": "pt"})
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"]["format"] = "pack-quantized"
    for group in config["quantization_config"]["config_groups"].values():
        group["format"] = "pack-quantized"
    (checkpoint / "config.json").write_text(json.dumps(config))
    index = checkpoint / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {n: shard.name for n in tensors}
        index.write_text(json.dumps(data))

    result = harness.run_case(checkpoint, "llama", "w8a8-int8+pack", 90)
    assert result.picks["qkv"] == "CompressedTensorsW8A8Int8", result.picks
    assert not result.loaded
    assert any(p.startswith("model.layers.0.self_attn.qkv_proj.weight:") and "never loaded" in p
               for p in result.problems), result.problems
    assert any(p.startswith("model.layers.0.self_attn.q_proj.weight_packed: on disk but no SGLang parameter")
               for p in result.problems), result.problems


def test_sglang_refuses_unshared_nvfp4_global_scales(bases: dict[str, Path], tmp_path: Path) -> None:
    """What qconvert's shared NVFP4 global scales are for: with one k_proj's global scale halved, SGLang's weight-only
    NVFP4 linear scheme refuses the fused q/k/v layer in its post-load processing (run up to the FP4 Marlin
    repacking by sglang_harness.check_microscaled)."""
    from safetensors.torch import load_file, save_file

    checkpoint, refusal = _build(Case("nvfp4", ("--scheme", "nvfp4")), bases["llama"], tmp_path)
    if checkpoint is None:
        pytest.skip(f"qconvert does not write nvfp4 here: {refusal}")
    name = "model.layers.1.self_attn.k_proj.weight_global_scale"
    shard = next(s for s in checkpoint.glob("*.safetensors") if name in load_file(s))
    tensors = load_file(shard)
    tensors[name] = tensors[name] / 2
    save_file(tensors, shard, metadata={"format": "pt"})
    result = harness.run_case(checkpoint, "llama", "nvfp4", 90)
    assert not result.loaded
    assert len(result.problems) == 1 and result.problems[0].startswith(
        "model.layers.1.self_attn.qkv_proj: SGLang's CompressedTensorsW4A16Fp4.process_weights_after_loading "
        "refuses it: ValueError: NVFP4 weight-only linear requires all fused projections to share one "
        "weight_global_scale"), result.problems


@pytest.mark.parametrize("kind", ["int4-asym", "int8-asym"])
def test_sglang_fails_moe_zero_points(kind: str, bases: dict[str, Path], tmp_path: Path) -> None:
    """Why qconvert.serving claims SGLang for the zero-point schemes on dense models only: on a Qwen3-MoE (no
    MLA), SGLang's CompressedTensorsWNA16MoE takes the experts but its loader cannot copy the checkpoint's
    (llm-compressor's layout) expert zero points into its parameters."""
    checkpoint, refusal = _build(Case(kind, ("--scheme", kind)), bases["qwen3_moe"], tmp_path)
    assert checkpoint is not None, refusal
    result = harness.run_case(checkpoint, "qwen3_moe", kind, 90)
    RESULTS.append(result)
    assert result.picks.get("experts") == "CompressedTensorsWNA16MoE", result.picks
    assert not result.loaded
    assert any(p.startswith("load_weights failed: RuntimeError: output with shape") for p in result.problems), \
        result.problems
