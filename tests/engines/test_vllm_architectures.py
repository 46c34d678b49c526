"""vLLM conformance tier over the architecture matrix (issue 11): every architecture of ``tests/arch_matrix.py``
that vLLM 0.33.0 has a model class for, through that real model class.

Each architecture's tiny seeded random checkpoint (the matrix's own builder, ``build_checkpoint``) is quantized
in-process by qconvert in rtn4 and fp8-block (and fp8 for the MoE ones; nvfp4, mxfp4 and mxfp8 for Qwen3-MoE,
GraniteMoE and gpt-oss, where a scheme qconvert refuses must be one the table does not claim); vLLM parses the
config, builds its model class for the architecture (``MistralForCausalLM``, ``Qwen3MoeForCausalLM``,
``Qwen2VLForConditionalGeneration``, its Transformers backend for GPT-NeoX and Olmo2, ...) so that
``CompressedTensorsConfig`` picks a method per layer, and
every tensor goes through the model's own ``load_weights`` (see ``vllm_harness``: every parameter written, equal to
the checkpoint, nothing on disk left unused). Capabilities: sm90 for every scheme, sm80 as well for rtn4; one
checkpoint per architecture and scheme, reused across capabilities.

The test asserts that vLLM loads a case exactly when ``qconvert.serving`` says vLLM serves the kind for the
architecture's family (every non-DeepSeek architecture is family "llama" there), and that every quantized layer
kind gets the table's ``method`` (MoE experts: ``moe_method``); routers and vision-tower layers (which qconvert
leaves unquantized) must get vLLM's unquantized linear method. Where vLLM refuses what the table claims, the case
is ``xfail(strict=True)`` with vLLM's exact message (``KNOWN_REFUSALS``).

Stubbed, as in ``test_vllm.py``: vLLM runs on its CPU platform with the capability query patched, kernel selection
falls back where this CPU has no kernel, and post-load processing runs for microscaled layers only (up to the GPU
repacking; ``vllm_harness.check_postload``). Results go to
``${QCONVERT_ENGINES_REPORT:-build/engines}/vllm-architectures.json`` (``family`` = the model_type).

Run in the vLLM venv: ``make engines``; skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.engines import vllm_harness as harness

_REASON = harness.unavailable_reason()
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)

os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(sys.prefix) / "vllm-cache"))

from qconvert import serving  # noqa: E402
from qconvert.errors import BadInputError  # noqa: E402
from tests.arch_matrix import CASES, ArchCase  # noqa: E402
from tests.test_architectures import build_checkpoint, run_quantize  # noqa: E402

# The matrix's architectures vLLM 0.33.0 registers a model class for (its registry, by the config's
# `architectures`). Left out: llama and deepseek_v3 (test_vllm.py covers them), bert and t5 (no generative model
# class for them in vLLM), gpt2 (nothing quantized: its Conv1D layers stay as they are).
ARCHITECTURES = ("mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "phi3", "gemma2", "gemma3", "opt", "gpt_neox",
                 "olmo2", "falcon", "granitemoe", "gpt_oss", "granitemoe-kept", "gpt_oss-kept", "qwen2_vl", "llava",
                 "gemma3_mm")
MOE = ("qwen3_moe", "mixtral", "granitemoe")
# MoE architectures with 3-D experts: qconvert writes them per expert by default (granitemoe, gpt_oss: the
# serving table's own families for them); the `-kept` cases keep them unquantized (--keep-fused-experts).
FUSED_EXPERTS_KEPT = ("granitemoe-kept", "gpt_oss-kept")

# vLLM's block-FP8 layers need every part of a fused layer (q/k/v → qkv_proj) to span whole 128-row blocks
# (``validate_fp8_block_shape``); the matrix's tiny models have 64-row k/v projections (2 KV heads of 32; Falcon's
# multi-query k/v: 32 rows), which qconvert quantizes in fp8-block with a partial block. The table lists fp8-block
# as served by vLLM for every "llama"-family model with no shape condition: a real disagreement, kept here as
# strict xfails with vLLM's message; each of these architectures is also run in fp8-block with wider k/v
# projections (``WIDE_KV``), which must load.
_NARROW = "ValueError: Weight output_partition_size = {rows} is not divisible by weight quantization block_n = 128."
# What vLLM says for the tiny models' partial blocks; qconvert now reports such outputs as not served by vLLM
# (serving.misaligned_layer), so these cases assert "not served, and vLLM refuses with exactly this".
NARROW_REFUSALS: dict[tuple[str, str, int], str] = {
    **{(arch, "fp8-block", 90): _NARROW.format(rows=64)
       for arch in ("mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma2", "gemma3", "olmo2", "granitemoe")},
    ("falcon", "fp8-block", 90): _NARROW.format(rows=32),
}
KNOWN_REFUSALS: dict[tuple[str, str, int], str] = {}
# The same architectures with k/v projections of 128 rows (the matrix's config otherwise): 4 KV heads of 32;
# Falcon: head_dim 128 (hidden 512, 4 heads).
WIDE_KV: dict[str, dict] = {
    **{arch: {"num_key_value_heads": 4} for arch, _, _ in NARROW_REFUSALS
       if arch != "falcon" and arch not in FUSED_EXPERTS_KEPT},
    "falcon": {"hidden_size": 512},
}

# Multimodal architectures whose vLLM model module cannot be imported here: vLLM's qwen2_vl.py imports
# transformers' Qwen2-VL image processor, which imports torchvision; its gemma3_mm.py and llava.py need torchvision
# too (llava.py also mistral_common, a pure-Python package the venv could get). torchvision's PyPI wheels link
# libtorch_cuda.so / libc10_cuda.so, which the CPU torch lacks (its CPU builds are only on download.pytorch.org).
# vLLM's registry inspection then fails before any model class is built ("Model architectures [...] failed to be
# inspected"; the subprocess's error: "ModuleNotFoundError: No module named 'torchvision'").
NEEDS_TORCHVISION = ("qwen2_vl", "llava", "gemma3_mm")

RESULTS: list[harness.Result] = []


class HarnessCannotPlace(AssertionError):
    """vLLM loaded without a loader error, but the harness cannot map some parameters to checkpoint tensors."""


class KnownRefusal(AssertionError):
    """vLLM refused the case with exactly the message ``KNOWN_REFUSALS`` records (any other failure fails)."""


def _case(name: str) -> ArchCase:
    """The matrix's case; ``<arch>+kv128``: the same with the ``WIDE_KV`` config changes."""
    arch, _, variant = name.partition("+")
    case = next(c for c in CASES if c.name == arch)
    return replace(case, name=name, config={**case.config, **WIDE_KV[arch]}) if variant else case


# The microscaled weight-only schemes, on the MoE architectures whose experts vLLM loads through another path each:
# Qwen3-MoE (per-expert modules), GraniteMoE and gpt-oss (3-D experts qconvert writes per expert, read by
# Mixtral's loader / gpt-oss's streamed-expert loader). At sm90 only (the capability choice is test_vllm.py's).
MICROSCALED = ("nvfp4", "mxfp4", "mxfp8")
MICROSCALED_ARCHITECTURES = ("qwen3_moe", "granitemoe", "gpt_oss")


def _schemes(arch: str) -> tuple[str, ...]:
    extra = MICROSCALED if arch in MICROSCALED_ARCHITECTURES else ()
    if arch == "gpt_oss":
        # rtn4 / rtn8: the schemes qconvert writes gpt-oss experts in; the others, where qconvert refuses them,
        # must be what the table says vLLM does not serve for gpt-oss
        return ("rtn4", "rtn8", *extra)
    if arch in FUSED_EXPERTS_KEPT:
        return ("rtn4",)
    return ("rtn4", "fp8-block", "fp8", *extra) if arch in MOE else ("rtn4", "fp8-block")


def _params() -> list:
    params = []
    for arch in ARCHITECTURES:
        for scheme in _schemes(arch):
            for capability in (80, 90) if scheme == "rtn4" else (90,):
                marks = []
                if (arch, scheme, capability) in KNOWN_REFUSALS:
                    marks.append(pytest.mark.xfail(strict=True, raises=KnownRefusal,
                                                   reason=KNOWN_REFUSALS[arch, scheme, capability]))
                elif arch in FUSED_EXPERTS_KEPT and scheme == "rtn4":
                    marks.append(pytest.mark.xfail(strict=True, raises=HarnessCannotPlace, reason=(
                        "vLLM loads it (experts and router unquantized, no loader error), but the harness cannot "
                        "place vLLM's fused expert parameters and renamed router in the 3-D checkpoint tensors")))
                params.append(pytest.param(arch, scheme, capability, id=f"{arch}-{scheme}-sm{capability}",
                                           marks=marks))
    params += [pytest.param(f"{arch}+kv128", "fp8-block", 90, id=f"{arch}+kv128-fp8-block-sm90") for arch in WIDE_KV]
    return params


class Checkpoints:
    """Each architecture's source and each (architecture, scheme) output built once per module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[tuple[str, str], tuple[Path | None, str]] = {}
        self.configs: dict[Path, object] = {}

    def get(self, arch: str, scheme: str) -> tuple[Path | None, str]:
        if (arch, scheme) not in self.built:
            case = _case(arch)
            source = build_checkpoint(case, self.root)
            out = self.root / f"{arch}-{scheme}"
            try:
                run_quantize(case, source, scheme, out)
                self.built[arch, scheme] = (out, "")
            except BadInputError as error:
                self.built[arch, scheme] = (None, str(error))
        return self.built[arch, scheme]

    def model_config(self, folder: Path) -> object:
        if folder not in self.configs:
            try:
                self.configs[folder] = harness.model_config(folder, max_model_len=None)
            except Exception as error:  # vLLM's refusal to parse the config is an observation
                self.configs[folder] = error
        return self.configs[folder]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    built = Checkpoints(tmp_path_factory.mktemp("vllm-architectures"))
    # Every source is built by transformers before vLLM builds any model: vLLM's Transformers backend (GPT-NeoX,
    # Olmo2) decorates transformers' own model classes in place, after which transformers cannot build them alone.
    for param in _params():
        arch, scheme, _ = param.values
        if arch.partition("+")[0] not in NEEDS_TORCHVISION or importlib.util.find_spec("torchvision") is not None:
            built.get(arch, scheme)
    return built


@pytest.fixture(scope="module", autouse=True)
def report() -> object:
    yield
    harness.write_report(RESULTS, "vllm-architectures", "architecture results")


def _family(folder: Path, split_experts: bool) -> str:
    """The table's family for the checkpoint (by its config's `architectures`; its model type where qconvert
    wrote 3-D experts per expert)."""
    return serving.family_of(json.loads((folder / "config.json").read_text()), split_experts)


@pytest.mark.parametrize(("arch", "scheme", "capability"), _params())
def test_vllm_loads_the_architecture_as_the_table_says(checkpoints: Checkpoints, arch: str, scheme: str,
                                                       capability: int) -> None:
    if arch in NEEDS_TORCHVISION and importlib.util.find_spec("torchvision") is None:
        pytest.skip(f"vLLM's {arch} model module imports torchvision, which this CPU venv cannot have (module doc)")
    model_type = _case(arch).model_type
    kept = "-kept" if arch in FUSED_EXPERTS_KEPT else ""
    family_label = model_type + kept + arch.partition("+")[1] + arch.partition("+")[2]  # e.g. "mistral+kv128"
    folder, refusal = checkpoints.get(arch, scheme)
    if folder is None:
        # qconvert refuses to write it: then the table must not claim that vLLM serves it for the family.
        family = _family(build_checkpoint(_case(arch), checkpoints.root), split_experts=not kept)
        RESULTS.append(harness.Result(harness.ENGINE, harness.VERSION, family_label, scheme, capability,
                                      problems=[f"qconvert refuses: {refusal}"]))
        assert serving.pick(scheme, serving.Engine.VLLM, capability, family) is None, (
            f"qconvert refuses {arch} in {scheme}, but the table says vLLM serves it (family {family}): {refusal}")
        return
    family = _family(folder, split_experts=not kept)
    config = checkpoints.model_config(folder)
    if isinstance(config, Exception):
        result = harness.Result(harness.ENGINE, harness.VERSION, family_label, scheme, capability,
                                problems=[harness._one_line(config)])
    else:
        result = harness.run_case(folder, family_label, scheme, capability, config)
    RESULTS.append(result)

    entry = serving.pick(scheme, serving.Engine.VLLM, capability, family)
    if _misaligned(folder, scheme) is not None:
        entry = None  # qconvert says: not served by vLLM (partial blocks); vLLM must refuse, with its own words
        narrow = NARROW_REFUSALS.get((arch, scheme, capability))
        assert narrow is None or result.problems == [narrow], result.problems
    served = entry is not None
    known = KNOWN_REFUSALS.get((arch, scheme, capability))
    placing = "filled by vLLM, but the checkpoint has no"
    if (arch in FUSED_EXPERTS_KEPT and not result.loaded and result.problems
            and all(placing in p or "no parameter of vLLM's model holds it" in p for p in result.problems)):
        raise HarnessCannotPlace(f"{arch}: {result.problems[:2]}")
    if known is not None and served and not result.loaded and result.problems == [known]:
        raise KnownRefusal(f"the table says vLLM serves {arch} in {scheme} at sm{capability}; vLLM: {known}")
    assert result.loaded == served, (
        f"vLLM {'loads' if result.loaded else 'does not load'} {arch} ({scheme}) at sm{capability}, the table "
        f"(family {family}) says it {'does' if served else 'does not'}: {result.problems[:3]}")
    if not result.loaded:
        return
    assert entry is not None
    wrong = {}
    quantized = 0
    for layer, pick in result.picks.items():
        if layer in ("gate", "router") or layer.startswith("vision:"):  # router, vision tower: unquantized
            want = "UnquantizedLinearMethod"
        else:
            kept = layer == "experts" and arch in FUSED_EXPERTS_KEPT  # --keep-fused-experts: ignored
            want = "UnquantizedFusedMoEMethod" if kept else entry.moe_method if layer == "experts" else entry.method
            quantized += 1
        if pick != want:
            wrong[layer] = f"{pick} (table: {want})"
    assert not wrong, f"{arch} ({scheme}) sm{capability}: {wrong}"
    assert quantized, f"{arch}: vLLM built no quantized layer: {result.picks}"
    if arch in MOE:
        assert "experts" in result.picks, f"{arch}: vLLM built no MoE experts layer: {result.picks}"


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_the_harness_sees_a_damaged_expert(checkpoints: Checkpoints, tmp_path: Path, arch: str) -> None:
    """The expert checks can fail: one expert's scales left out of the checkpoint is reported (never written by
    vLLM's MoE loader, or a missing part of what vLLM's expert mapping expects)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder, _ = checkpoints.get(arch, "rtn4")
    assert folder is not None
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shard = next(broken.glob("*.safetensors"))
    tensors = load_file(shard)
    dropped = next(n for n in sorted(tensors) if ".experts.1." in n and n.endswith("weight_scale"))
    del tensors[dropped]
    save_file(tensors, shard, metadata={"format": "pt"})
    result = harness.run_case(broken, _case(arch).model_type, "rtn4", 90, harness.model_config(broken, None))
    assert not result.loaded
    assert any("experts" in problem for problem in result.problems), result.problems


@pytest.mark.parametrize(("arch", "scheme"), [("gpt_oss", "rtn4"), ("gpt_oss", "rtn8"), ("granitemoe", "rtn4"),
                                            ("granitemoe", "fp8"), *(("granitemoe", s) for s in MICROSCALED)])
def test_vllm_reads_per_expert_layers_as_the_source_experts(checkpoints: Checkpoints, arch: str, scheme: str) -> None:
    """The axis and the gate/up order of qconvert's per-expert layout, as vLLM reads it: vLLM's fused expert
    parameters loaded from the quantized checkpoint, dequantized (compressed-tensors' unpacking, scales expanded
    per group / channel), equal an independent fake quantization of the parameters vLLM itself loads from the
    bf16 source (``w13_weight`` [experts, 2 x inter, hidden]: gpt-oss's interleaved gate/up rows, GraniteMoE's
    gate then up; ``w2_weight``) to within rounding. A transposed or reordered expert is off by ~100%."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from tests.test_architectures import _fake, rel

    folder, refusal = checkpoints.get(arch, scheme)
    if folder is None and scheme in MICROSCALED:  # (a scheme qconvert lacks: the table test above says so)
        pytest.skip(f"qconvert does not write {arch} in {scheme}: {refusal}")
    assert folder is not None, refusal
    source = build_checkpoint(_case(arch), checkpoints.root)
    quantized = harness.loaded_parameters(folder)
    reference = harness.loaded_parameters(source)
    if scheme in MICROSCALED:
        _compare_microscaled_experts(quantized, reference, scheme)
        return
    compared = 0
    for name, want in reference.items():
        if not name.endswith(("experts.routed_experts.w13_weight", "experts.routed_experts.w2_weight")):
            continue
        scale = quantized[f"{name}_scale"].float()
        if f"{name}_packed" in quantized:
            values = unpack_from_int32(quantized[f"{name}_packed"], 4 if scheme == "rtn4" else 8, want.shape).float()
        else:
            values = quantized[name].float()
        for expert in range(want.shape[0]):
            rows, cols = want.shape[1] // scale.shape[1], want.shape[2] // scale.shape[2]
            expanded = scale[expert].repeat_interleave(rows, 0).repeat_interleave(cols, 1)
            got = values[expert] * expanded
            expected = _fake(want[expert], scheme, want.dtype, None)
            assert rel(got, expected) < 1e-2, (name, expert, rel(got, expected))
            compared += 1
    assert compared == 2 * 2 * 4, compared  # layers x (w13, w2) x experts


def _compare_microscaled_experts(quantized: dict, reference: dict, scheme: str) -> None:
    """The microscaled form of the check above: vLLM's loaded codes x scales (NVFP4: each half of w13 with its own
    global scale, as stored) against the bf16 source's experts as vLLM loads them, to within the format's rounding
    (relative error ~0.1 for FP4, ~0.03 for MXFP8 on these random weights; a transposed or reordered expert: ~1.4)."""
    from tests.engines import microscaled
    from tests.test_architectures import rel

    limit = 0.06 if scheme == "mxfp8" else 0.2
    compared = 0
    for name, want in reference.items():
        if not name.endswith(("experts.routed_experts.w13_weight", "experts.routed_experts.w2_weight")):
            continue
        codes = quantized[name if scheme == "mxfp8" else f"{name}_packed"]
        scale = quantized[f"{name}_scale"].float()
        for expert in range(want.shape[0]):
            values = codes[expert].float() if scheme == "mxfp8" else microscaled.fp4_codes(codes[expert])
            rows, cols = values.shape
            if scheme == "nvfp4":  # [E, 2] for w13 (gate, up), [E] for w2: per stored part
                divisors = quantized[f"{name}_global_scale"][expert].float().reshape(-1)
                factor = scale[expert] / divisors.repeat_interleave(rows // divisors.numel()).unsqueeze(-1)
            else:
                factor = torch.exp2(scale[expert] - 127)
            got = (values.reshape(rows, factor.shape[-1], -1) * factor.unsqueeze(-1)).reshape(rows, cols)
            error = rel(got, want[expert].float())
            assert error < limit, (name, expert, error)
            compared += 1
    assert compared == 2 * 2 * 4, compared  # layers x (w13, w2) x experts


def _misaligned(folder: Path | None, scheme: str) -> tuple[str, tuple[int, ...]] | None:
    """What qconvert's serving table says about the written checkpoint's block alignment."""
    if folder is None:
        return None
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    scaled: set[str] = set()
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                if name.endswith(".weight_scale"):
                    scaled.add(name.removesuffix(".weight_scale"))
                elif name.endswith(".weight"):
                    shapes[name.removesuffix(".weight")] = tuple(f.get_slice(name).get_shape())
    return serving.misaligned_layer(scheme, [(m, shapes[m]) for m in sorted(scaled) if m in shapes])
