"""MoE expert blocks are planned whole, ``ignore`` agrees with what is written, and hostile names cannot hang planning.

vLLM and SGLang load all experts of one layer (every expert's gate/up/down, however they are stored) as ONE
fused-MoE layer with one quantization method. A plan that quantizes some parts of such a block and leaves others
in full precision (with the block named in ``ignore``) is a checkpoint the engines misread. So: options that would
split a block are refused with the parts named; a part that the scheme cannot quantize (an intermediate size that
is not a multiple of the group size) leaves the whole block unquantized, each part saying why.

The invariants (:func:`assert_engine_consistent`) are written here from the engines' rules, not from qconvert's:
every expert block has one fate; ``ignore`` never matches a quantized module (nor the fused layers engines build
from quantized parts); every unquantized linear, and every unquantized expert block under the names vLLM asks
about, is matched by ``ignore`` (every config written has a ``Linear`` catch-all group).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qconvert.errors import BadInputError
from qconvert.pipeline import QuantizeRequest, prepare_quantize
from qconvert.planning import MAX_NAME_CHARS, Plan, _is_norm
from qconvert.schemes import get_scheme
from tests.arch_matrix import CASES, EXPERTS, LAYERS, ArchCase
from tests.conftest import run_cli

transformers = pytest.importorskip("transformers")
from tests import test_architectures as matrix  # noqa: E402

# ---------------------------------------------------------------- the engines' rules, written independently

_PER_EXPERT = re.compile(r"^(.*\.experts)\.\d+\.[^.]+$")
_STORED_3D = (re.compile(r"^(.*)\.(?:input_linear|output_linear)$"),  # GraniteMoE, hub names
              re.compile(r"^(.*\.experts)\.(?:gate_up_proj|down_proj)$"))  # gpt-oss, transformers 5 GraniteMoE
# vLLM's packed-modules maps: the fused layer it builds, from parts (all in one scheme).
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
          "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa")}


def _block(module: str, three_d: bool) -> str | None:
    if three_d:
        for pattern in _STORED_3D:
            found = pattern.match(module)
            if found:
                return found.group(1) if found.group(1).endswith(".experts") else f"{found.group(1)}.experts"
        raise AssertionError(f"3-D weight {module} in no expert block")
    found = _PER_EXPERT.match(module)
    return found.group(1) if found else None


def _ignored(ignore: list[str], module: str) -> bool:
    """compressed-tensors semantics: ``re:`` entries with re.match, other entries exact names."""
    return any(re.match(entry[3:], module) if entry.startswith("re:") else entry == module for entry in ignore)


def assert_engine_consistent(plan: Plan, config: dict) -> None:
    ignore = config["ignore"]
    quantized: dict[str, str] = {m: s.name for m, s in plan.schemes_by_module.items()}
    blocks: dict[str, dict[str, str | None]] = {}
    for module, scheme in quantized.items():
        if (block := _block(module, False)) is not None:
            blocks.setdefault(block, {})[module] = scheme
    for skipped in plan.skipped:
        if (block := _block(skipped.module, len(skipped.shape) == 3)) is not None:
            blocks.setdefault(block, {})[skipped.module] = None
    for block, members in blocks.items():
        assert len(set(members.values())) == 1, (block, members)  # one fused-MoE layer, one scheme
    # ignore never names a quantized module, nor a fused layer built from quantized parts, nor a quantized block.
    fused = {f"{m.rpartition('.')[0]}.{leaf}" for m in quantized for leaf, parts in _FUSED.items()
             if m.rpartition(".")[2] in parts}
    quantized_blocks = {b for b, members in blocks.items() if None not in members.values()}
    for module in [*quantized, *fused, *quantized_blocks]:
        assert not _ignored(ignore, module), (module, [e for e in ignore if _ignored([e], module)])
    # Every unquantized linear, and every unquantized expert block as vLLM asks about it, is in ignore.
    for skipped in plan.skipped:
        if skipped.runtime_linear:
            assert _ignored(ignore, skipped.module), (skipped.module, skipped.reason, ignore)
    for block, members in blocks.items():
        if None in members.values():
            assert _ignored(ignore, block), (block, ignore)
            assert _ignored(ignore, f"{block}.0.gate_proj") and _ignored(ignore, f"{block}.0.w13"), (block, ignore)
    # Module targets of a mixed-precision config name quantized modules only.
    for group in config["config_groups"].values():
        for target in group["targets"]:
            if target != "Linear":
                assert not _ignored(ignore, target), (target, ignore)


# ---------------------------------------------------------------- checkpoints and plans


@pytest.fixture(scope="session")
def moe_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("moe")


def _case(name: str) -> ArchCase:
    return next(case for case in CASES if case.name == name)


def _narrow(name: str, intermediate: int) -> ArchCase:
    """An MoE case whose experts' intermediate size is ``intermediate`` (192: not a multiple of 128)."""
    case = _case(name)
    key = "moe_intermediate_size" if name == "qwen3_moe" else "intermediate_size"
    return replace(case, name=f"{name}-i{intermediate}", config={**case.config, key: intermediate})


def plan_of(case: ArchCase, root: Path, scheme: str = "rtn4", group_size: int | None = None,
            **options: object) -> tuple[Plan, dict]:
    request = QuantizeRequest(model=str(matrix.build_checkpoint(case, root)), scheme=get_scheme(scheme, group_size),
                              dry_run=True, show_progress=False, **{**case.request, **options})
    prepared = prepare_quantize(request, lambda _: None)
    return prepared.plan, prepared.config


def _over(*items: str) -> list[tuple[str, object]]:
    return [(p, None if s == "none" else get_scheme(s)) for p, s in (i.rsplit("=", 1) for i in items)]


def _skip_reasons(plan: Plan) -> dict[str, str]:
    return {s.module: s.reason for s in plan.skipped}


# ---------------------------------------------------------------- the whole matrix

_FAST_FAMILIES = {"qwen3_moe", "granitemoe", "granitemoe-kept", "gpt_oss", "gpt_oss-kept", "deepseek_v3"}


def _matrix() -> list:
    return [pytest.param(case, scheme, id=f"{case.name}-{scheme}",
                         marks=[] if case.name in _FAST_FAMILIES else [pytest.mark.arch])
            for case in CASES for scheme in case.schemes]


@pytest.mark.parametrize(("case", "scheme"), _matrix())
def test_every_architecture_and_scheme_plans_what_engines_read(case: ArchCase, scheme: str, moe_root: Path) -> None:
    plan, config = plan_of(case, moe_root, scheme)
    assert_engine_consistent(plan, config)


# ---------------------------------------------------------------- intermediate sizes the group does not divide


@pytest.mark.parametrize("scheme", ["rtn4", "rtn8"])
def test_qwen3_moe_misaligned_down_leaves_each_expert_block_whole_unquantized(scheme: str, moe_root: Path) -> None:
    plan, config = plan_of(_narrow("qwen3_moe", 192), moe_root, scheme)
    assert_engine_consistent(plan, config)
    reasons = _skip_reasons(plan)
    for i in range(LAYERS):
        for e in range(EXPERTS):
            for leaf in ("gate_proj", "up_proj", "down_proj"):
                module = f"model.layers.{i}.mlp.experts.{e}.{leaf}"
                assert module in reasons, module
                assert "input size 192 is not a multiple of the group size 128" in reasons[module], reasons[module]
        assert "expert block left unquantized whole" in reasons[f"model.layers.{i}.mlp.experts.0.gate_proj"]
        assert "its down_proj cannot be quantized" in reasons[f"model.layers.{i}.mlp.experts.3.up_proj"]
        assert f"model.layers.{i}.mlp.experts" in config["ignore"]
    assert {m for m in plan.schemes_by_module} == {f"model.layers.{i}.self_attn.{p}" for i in range(LAYERS)
                                                   for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert plan.coverage["by_kind"]["experts"]["share"] == 0


@pytest.mark.parametrize(("scheme", "intermediate", "quantized"), [
    ("fp8", 192, True),  # per channel: no group
    ("fp8-block", 192, True),  # blocks pad
    ("mxfp4", 192, True),  # 192 = 6 x 32
    ("mxfp4", 200, False),
    ("nvfp4", 200, False),  # 200 is no multiple of 16
])
def test_qwen3_moe_expert_blocks_follow_the_schemes_group(scheme: str, intermediate: int, quantized: bool,
                                                           moe_root: Path) -> None:
    plan, config = plan_of(_narrow("qwen3_moe", intermediate), moe_root, scheme)
    assert_engine_consistent(plan, config)
    assert set(plan.expert_blocks.values()) == ({scheme} if quantized else {None}), plan.expert_blocks


@pytest.mark.parametrize("scheme", ["rtn4", "rtn8"])
def test_granitemoe_misaligned_keeps_both_3d_tensors_of_each_layer(scheme: str, moe_root: Path) -> None:
    plan, config = plan_of(_narrow("granitemoe", 192), moe_root, scheme)
    assert_engine_consistent(plan, config)
    assert not plan.splits
    reasons = _skip_reasons(plan)
    for i in range(LAYERS):
        down = reasons[f"model.layers.{i}.block_sparse_moe.output_linear"]
        gate_up = reasons[f"model.layers.{i}.block_sparse_moe.input_linear"]
        assert "per-expert down_proj [128, 192]: input size 192 is not a multiple of the group size 128" in down
        assert "left unquantized whole" in gate_up and "down_proj" in gate_up, gate_up
    assert plan.expert_blocks == {f"model.layers.{i}.block_sparse_moe.experts": None for i in range(LAYERS)}


def test_granitemoe_misaligned_in_a_finer_group_is_quantized_whole(moe_root: Path) -> None:
    plan, config = plan_of(_narrow("granitemoe", 192), moe_root, "rtn4", group_size=64)
    assert_engine_consistent(plan, config)
    assert len(plan.splits) == 2 * LAYERS and set(plan.expert_blocks.values()) == {"rtn4"}


@pytest.mark.parametrize("group_size", [None, 64])
def test_gpt_oss_misaligned_w2_decides_its_whole_block(group_size: int | None, moe_root: Path) -> None:
    plan, config = plan_of(_narrow("gpt_oss", 192), moe_root, "rtn4", group_size=group_size)
    assert_engine_consistent(plan, config)
    if group_size is None:
        assert not plan.splits and set(plan.expert_blocks.values()) == {None}
        reasons = _skip_reasons(plan)
        assert "per-expert w2 [128, 192]" in reasons["model.layers.0.mlp.experts.down_proj"]
        assert "w2" in reasons["model.layers.0.mlp.experts.gate_up_proj"]
    else:
        assert len(plan.splits) == 2 * LAYERS and set(plan.expert_blocks.values()) == {"rtn4"}


def test_whole_unquantized_3d_expert_blocks_load_in_transformers(moe_root: Path) -> None:
    """The architecture matrix's own check (plan, loading on both compressed-tensors paths with no missing or
    unexpected keys, logits against an independent fake quantization) on a misaligned GraniteMoE: attention
    quantized, both 3-D expert tensors of every layer in full precision."""
    case = replace(_narrow("granitemoe", 192), experts_split=False,
                   expected=[f"model.layers.{{i}}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
                   skipped={"model.layers.{i}.block_sparse_moe.output_linear": "group size 128",
                            "model.layers.{i}.block_sparse_moe.input_linear": "left unquantized whole"})
    matrix.test_architecture(case, "rtn4", moe_root)


def test_unquantized_per_expert_blocks_are_refused_by_transformers_itself(moe_root: Path) -> None:
    """transformers 5.25 cannot load a Qwen3-MoE whose per-expert weights are unquantized under a
    compressed-tensors config (its experts' weight conversion finds no tensors: "Concatenate on tensors
    destined for ...experts.gate_up_proj"), whatever ``ignore`` says, and also for ``--ignore 're:.*experts.*'``.
    Asserted, so that a fix shows up. (Before expert blocks were planned whole, this output loaded with the
    experts' down_proj silently missing, i.e. randomly initialised.)"""
    case = _narrow("qwen3_moe", 192)
    output = moe_root / "qwen3_moe-i192-rtn4"
    matrix.run_quantize(case, matrix.build_checkpoint(case, moe_root), "rtn4", output)
    for kwargs in ({}, {"quantization_config": matrix.CompressedTensorsConfig(dequantize=True)}):
        with pytest.raises(RuntimeError, match="conversion of the weights"):
            matrix.load(output, case, **kwargs)


# ---------------------------------------------------------------- options that would split a block


@pytest.mark.parametrize(("name", "options", "needles"), [
    # =none on one 3-D tensor of GraniteMoE / gpt-oss
    ("granitemoe", {"overrides": _over(r"re:.*\.output_linear=none")}, ("down_proj", "gate_proj", "--override")),
    ("gpt_oss", {"overrides": _over(r"re:.*experts\.down_proj=none")}, ("w2", "w13")),
    # one expert's projection, in another scheme or none
    ("granitemoe", {"overrides": _over("model.layers.0.block_sparse_moe.experts.0.gate_proj=rtn8")},
     ("0.gate_proj -> rtn8",)),
    ("gpt_oss", {"overrides": _over("model.layers.1.mlp.experts.2.w13=rtn8")}, ("2.w13 -> rtn8",)),
    ("qwen3_moe", {"overrides": _over("model.layers.0.mlp.experts.0.gate_proj=rtn8")}, ("0.gate_proj -> rtn8",)),
    ("qwen3_moe", {"overrides": _over("model.layers.0.mlp.experts.3.down_proj=none")}, ("3.down_proj -> none",)),
    ("mixtral", {"overrides": _over("model.layers.1.block_sparse_moe.experts.0.w2=none")}, ("0.w2 -> none",)),
    ("deepseek_v3", {"overrides": _over("model.layers.1.mlp.experts.1.up_proj=fp8")}, ("1.up_proj -> fp8",)),
    # one expert's whole MLP
    ("qwen3_moe", {"overrides": _over(r"re:model\.layers\.1\.mlp\.experts\.2\..*=none")},
     ("2.gate_proj", "2.up_proj", "2.down_proj")),
    ("granitemoe", {"overrides": _over(r"re:.*experts\.0\..*=rtn8")}, ("0.gate_proj", "0.down_proj")),
    ("gpt_oss", {"overrides": _over(r"re:.*experts\.0\..*=none")}, ("0.w13", "0.w2")),
    # --ignore and --targets that cut through a block
    ("qwen3_moe", {"ignore": ["model.layers.1.mlp.experts.2.down_proj"]}, ("--ignore",)),
    ("granitemoe", {"ignore": ["model.layers.0.block_sparse_moe.experts.3.up_proj"]}, ("3.up_proj",)),
    ("qwen3_moe", {"targets": [r"re:.*(gate|up)_proj$"]}, ("--targets", "down_proj")),
])
def test_options_that_split_an_expert_block_are_refused_with_its_parts(name: str, options: dict,
                                                                        needles: tuple[str, ...],
                                                                        moe_root: Path) -> None:
    with pytest.raises(BadInputError) as caught:
        plan_of(_case(name), moe_root, "rtn4", **options)
    message = str(caught.value)
    assert "one fused-MoE layer with one scheme" in message and "experts" in message, message
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_a_split_refusal_is_one_line_exit_2(moe_root: Path) -> None:
    source = matrix.build_checkpoint(_case("granitemoe"), moe_root)
    result = run_cli("quantize", source, "--scheme", "rtn4", "--dry-run",
                     "--override", "model.layers.0.block_sparse_moe.experts.0.gate_proj=rtn8")
    assert result.code == 2, (result.code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "model.layers.0.block_sparse_moe.experts" in lines[0] and "0.gate_proj -> rtn8" in lines[0], lines[0]


@pytest.mark.parametrize(("name", "pattern", "layer0"), [
    ("qwen3_moe", r"re:model\.layers\.0\.mlp\.experts\..*", "model.layers.0.mlp.experts"),
    ("granitemoe", r"re:model\.layers\.0\.block_sparse_moe\.experts\..*", "model.layers.0.block_sparse_moe.experts"),
    ("granitemoe", r"re:model\.layers\.0\.block_sparse_moe\.(input|output)_linear",
     "model.layers.0.block_sparse_moe.experts"),
    ("gpt_oss", r"re:model\.layers\.0\.mlp\.experts\..*", "model.layers.0.mlp.experts"),
    ("mixtral", r"re:model\.layers\.0\.block_sparse_moe\.experts\..*", "model.layers.0.block_sparse_moe.experts"),
])
@pytest.mark.parametrize("fate", ["none", "rtn8"])
def test_an_override_over_a_whole_block_applies(name: str, pattern: str, layer0: str, fate: str,
                                                moe_root: Path) -> None:
    plan, config = plan_of(_case(name), moe_root, "rtn4", overrides=_over(f"{pattern}={fate}"))
    assert_engine_consistent(plan, config)
    assert plan.expert_blocks[layer0] == (None if fate == "none" else fate)
    assert plan.expert_blocks[layer0.replace("layers.0", "layers.1")] == "rtn4"
    if fate == "none":
        assert layer0 in config["ignore"]


def test_ignoring_a_whole_block_with_ignore(moe_root: Path) -> None:
    plan, config = plan_of(_case("qwen3_moe"), moe_root, "rtn4", ignore=[r"re:model\.layers\.1\.mlp\.experts\..*"])
    assert_engine_consistent(plan, config)
    assert plan.expert_blocks == {"model.layers.0.mlp.experts": "rtn4", "model.layers.1.mlp.experts": None}


def test_shared_experts_are_outside_the_routed_block(moe_root: Path) -> None:
    """DeepSeek's shared experts are ordinary linear layers: an override on them alone is no split."""
    plan, config = plan_of(_case("deepseek_v3"), moe_root, "rtn4", overrides=_over(r"re:.*shared_experts\..*=none"))
    assert_engine_consistent(plan, config)
    assert plan.expert_blocks == {"model.layers.1.mlp.experts": "rtn4"}
    assert "model.layers.1.mlp.shared_experts.down_proj" in config["ignore"]


def test_targets_over_the_experts_leave_attention_in_ignore(moe_root: Path) -> None:
    plan, config = plan_of(_case("qwen3_moe"), moe_root, "rtn4", targets=[r"re:.*experts.*"])
    assert_engine_consistent(plan, config)
    assert set(plan.expert_blocks.values()) == {"rtn4"}
    assert "model.layers.0.self_attn.q_proj" in config["ignore"]


def test_a_targeted_layer_the_scheme_cannot_quantize_is_still_ignored(moe_root: Path) -> None:
    """A layer named by --targets but left unquantized (misaligned) is a Linear the config's catch-all reaches."""
    plan, config = plan_of(_narrow("qwen3_moe", 192), moe_root, "rtn4", targets=[r"re:.*(experts|self_attn).*"])
    assert_engine_consistent(plan, config)
    assert "model.layers.0.mlp.experts.0.down_proj" in config["ignore"]


def test_a_quantized_head_is_not_in_ignore(moe_root: Path) -> None:
    plan, config = plan_of(_case("qwen3_moe"), moe_root, "rtn4", targets=[r"re:.*(_proj|lm_head)$"])
    assert_engine_consistent(plan, config)
    assert "lm_head.weight" in plan.quantize and "lm_head" not in config["ignore"]


# ---------------------------------------------------------------- hostile names


def _with_extra_tensor(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"model.layers.0.mlp.down_proj.weight": torch.randn(128, 128, dtype=torch.bfloat16),
               name: torch.randn(128, 128, dtype=torch.bfloat16)}, folder / "model.safetensors",
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return folder


@pytest.mark.parametrize("name", ["norm_" * 80_000 + "-.weight", "a." * 200_000 + "weight",
                                  "model." + "_embeddings" * 40_000 + "-.weight"])
def test_a_400kb_tensor_name_is_refused_in_one_line(name: str, tmp_path: Path) -> None:
    source = _with_extra_tensor(tmp_path / "model", name)
    result = run_cli("quantize", source, "--scheme", "rtn4", "--dry-run", "--ignore", "re:(a|a)*(b|b)*$")
    assert result.code == 2, (result.code, result.stderr[-500:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and len(lines[0]) < 400, lines
    assert "model.safetensors: tensor name of" in lines[0] and f"longer than {MAX_NAME_CHARS}" in lines[0]


def test_names_up_to_the_limit_are_planned(tmp_path: Path) -> None:
    """The longest allowed name, shaped as the norm check once backtracked on, plans (and is no norm)."""
    name = ("norm_" * MAX_NAME_CHARS)[: MAX_NAME_CHARS - len("-.weight")] + "-.weight"
    source = _with_extra_tensor(tmp_path / "model", name)
    started = time.perf_counter()
    request = QuantizeRequest(model=str(source), scheme=get_scheme("rtn4"), dry_run=True, show_progress=False)
    plan = prepare_quantize(request, lambda _: None).plan
    assert name in plan.quantize
    assert time.perf_counter() - started < 30  # generous: the quadratic pattern took minutes at 400 kB


@pytest.mark.parametrize(("module", "norm"), [
    ("model.norm", True), ("model.layers.0.input_layernorm", True), ("transformer.ln_f", True),
    ("transformer.h.0.ln_1", True), ("ln", True), ("model.layers.0.self_attn.q_norm", True),
    ("encoder.LayerNorm", True), ("model.layers.0.mlp.down_proj", False), ("model.lnx", False),
    ("norm_norm-", False), ("model.layers.0.norm.weight_x-y", False), ("model.ln_", False),
])
def test_the_norm_check_matches_the_old_pattern(module: str, norm: bool) -> None:
    old = re.compile(r"(^|\.)(\w*norm\w*|ln_\w+|ln)$", re.IGNORECASE)
    assert _is_norm(module) is norm
    assert (old.search(module) is not None) is norm
