"""Planning: which tensor gets which scheme, decided from the architecture, names, shapes and dtypes.

A checkpoint has no module types, so "linear layer" is inferred: a 2-D floating-point ``*.weight``
that is not an embedding, an output head, a norm or an MoE router. ``config.json`` refines that
(:mod:`qconvert.architectures`): GPT-2-style ``Conv1D`` weights are stored transposed, some
embeddings are not called embeddings, 3-D fused experts and vision towers are linear weights that
no plain rule sees. Every weight left unquantized gets a reason, and every linear-looking layer left
unquantized is written into the config's ``ignore`` list, so that runtimes which match
``targets: ["Linear"]`` never expect quantized tensors for it; ``ignore`` never names a quantized one.

An MoE layer's experts (every expert's gate/up/down, 2-D per expert or 3-D stacked) are one fused-MoE
layer in vLLM and SGLang, loaded with one scheme: such an expert block is planned whole (see
:func:`make_plan`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from qconvert.architectures import (
    ExpertPart,
    ExpertSplit,
    LayerKind,
    ModelFacts,
    expert_split,
    facts_from_config,
    is_expert_3d,
    layer_kind,
    vision_ignore_pattern,
)
from qconvert.checkpoint import Checkpoint
from qconvert.errors import BadInputError
from qconvert.safetensors_io import TensorInfo
from qconvert.schemes import SCHEMES, Scheme

_EMBEDDING = re.compile(r"(^|\.)(embed\w*|\w*_embeddings?|embeddings|wte|wpe|shared)$")
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output_layer|predictions\.decoder)$")
# Matched against a module's last component only (``_is_norm``): ``\w*norm\w*`` searched over a whole
# name backtracks quadratically on a hostile one (``norm_norm_...-``).
_NORM_LEAF = re.compile(r"ln(_\w+)?", re.IGNORECASE)
_WORD = re.compile(r"\w+")
# Longer tensor names are refused before any pattern sees them (real ones are under 200 characters).
MAX_NAME_CHARS = 1024
# MoE routers of every spelling: Mixtral/Qwen `gate`, gpt-oss `router`, GraniteMoE `router.layer`
# (renamed `router` by transformers at load), Qwen2-MoE `shared_expert_gate`.
_ROUTER = re.compile(r"(^|\.)(gate|router|router\.layer|shared_expert_gate)$")
_HEAD_ARCHITECTURES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForMaskedLM")

CONV1D_REASON = ("Conv1D weight stored [in, out]: compressed-tensors loaders quantize nn.Linear [out, in] "
                 "only, so it stays unquantized rather than be scaled along its output axis")
EXPERTS_3D_REASON = ("3-D fused experts: no quantized layout of them loads in transformers "
                     "(no per-expert converter for this architecture)")
# For architectures whose split is known (architectures.EXPERT_SPLITS) but not for the chosen scheme.
EXPERTS_SCHEME_REASON = "3-D fused experts: {model_type} experts load quantized only in {schemes} ({why})"
KEPT_EXPERTS_NOTE = "kept in full precision (--keep-fused-experts)"


@dataclass(frozen=True)
class SkippedLayer:
    module: str
    shape: tuple[int, ...]
    reason: str
    runtime_linear: bool  # a runtime would treat it as a Linear, so it must be in `ignore`
    kind: LayerKind | None = None  # a linear weight's kind (counted in coverage); None: not a linear


@dataclass(frozen=True)
class SplitExperts:
    """A 3-D expert tensor written as one quantized ``[out, in]`` layer per expert and part."""

    tensor: str
    split: ExpertSplit
    scheme: Scheme
    shape: tuple[int, ...]  # the stored [experts, ...]

    @property
    def part_shapes(self) -> list[tuple[int, ...]]:
        """Each part's [out, in], in the order of ``split.parts``."""
        return [self.split.part_shape(part, self.shape) for part in self.split.parts]

    @property
    def layers(self) -> list[tuple[str, int, ExpertPart, tuple[int, ...]]]:
        """(module, expert, part, [out, in]) of every per-expert layer, expert by expert."""
        parts, shapes = self.split.parts, self.part_shapes
        modules = self.split.modules(self.tensor, self.shape[0])
        return [(module, i // len(parts), parts[i % len(parts)], shapes[i % len(parts)])
                for i, module in enumerate(modules)]

    @property
    def modules(self) -> list[str]:
        return [module for module, *_ in self.layers]


@dataclass
class Plan:
    scheme: Scheme
    quantize: dict[str, Scheme]  # weight tensor name → scheme
    skipped: list[SkippedLayer] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    facts: ModelFacts = field(default_factory=ModelFacts)
    linear_params: dict[str, tuple[int, int]] = field(default_factory=dict)  # kind → (quantized, total)
    splits: dict[str, SplitExperts] = field(default_factory=dict)  # 3-D expert tensor → its per-expert layers
    expert_blocks: dict[str, str | None] = field(default_factory=dict)  # `...experts` → its scheme (None: unquantized)

    def scheme_for(self, info: TensorInfo) -> Scheme | None:
        return self.quantize.get(info.name)

    @property
    def coverage(self) -> dict:
        """Share of linear parameters quantized, overall and per kind (the output head excluded:
        every scheme keeps it in full precision by convention)."""
        quantized = sum(q for q, _ in self.linear_params.values())
        total = sum(t for _, t in self.linear_params.values())
        return {
            "share": round(quantized / total, 6) if total else None,
            "quantized_params": quantized,
            "linear_params": total,
            "by_kind": {kind: {"share": round(q / t, 6) if t else None, "quantized_params": q, "linear_params": t}
                        for kind, (q, t) in sorted(self.linear_params.items())},
        }

    @property
    def schemes_by_module(self) -> dict[str, Scheme]:
        modules = {module_of(name): scheme for name, scheme in self.quantize.items()}
        for split in self.splits.values():
            modules.update(dict.fromkeys(split.modules, split.scheme))
        return modules

    @property
    def schemes(self) -> list[Scheme]:
        """Every scheme the plan writes."""
        return [*self.quantize.values(), *(s.scheme for s in self.splits.values())]


def module_of(tensor_name: str) -> str:
    return tensor_name.rsplit(".", 1)[0] if "." in tensor_name else tensor_name


def compile_patterns(patterns: list[str], option: str) -> list[str]:
    """Validate compressed-tensors style patterns: an exact module name, or ``re:`` + a regex."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise BadInputError(f"{option} {pattern!r}: invalid regular expression ({exc})") from exc
        elif not pattern:
            raise BadInputError(f"{option}: empty pattern")
    return patterns


def matches(pattern: str, module: str) -> bool:
    """compressed-tensors semantics: ``re:`` patterns use ``re.match``, others are exact names."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return pattern == module


def _not_a_candidate(info: TensorInfo, facts: ModelFacts) -> str | None:
    """Tensors no plan can quantize, whatever the options: not a floating-point linear weight."""
    if is_expert_3d(info.name, info.shape) and info.dtype.is_floating_point:
        return None
    if not info.name.endswith(".weight"):
        return "not a weight"
    if not info.dtype.is_floating_point:
        return f"not floating point ({info.dtype})"
    if len(info.shape) != 2:
        return f"{len(info.shape)}-D, not a linear weight"
    return None


def _layout_problem(info: TensorInfo, facts: ModelFacts, keep_experts: bool, scheme: Scheme
                    ) -> tuple[str, LayerKind] | None:
    """Linear weights whose stored layout no compressed-tensors loader reads quantized."""
    module = module_of(info.name) if info.name.endswith(".weight") else info.name
    if is_expert_3d(info.name, info.shape):
        reason = EXPERTS_3D_REASON
        split = expert_split(facts.model_type, info.name, info.shape)
        if split is not None and split.formats is not None and not isinstance(scheme.format, split.formats):
            names = "/".join(n for n, s in SCHEMES.items() if isinstance(s.format, split.formats))
            reason = EXPERTS_SCHEME_REASON.format(model_type=facts.model_type, schemes=names, why=split.why)
        if keep_experts:
            reason = f"{reason}; {KEPT_EXPERTS_NOTE}"
        return reason, LayerKind.EXPERTS
    if facts.is_conv1d(module):
        return CONV1D_REASON, layer_kind(module, facts)
    return None


def _is_norm(module: str) -> bool:
    """A norm's weight: the module's last component contains ``norm`` (any case) or is ``ln``/``ln_*``."""
    leaf = module.rpartition(".")[2]
    return _WORD.fullmatch(leaf) is not None and ("norm" in leaf.lower() or _NORM_LEAF.fullmatch(leaf) is not None)


def _default_skip_reason(info: TensorInfo, facts: ModelFacts, include_vision: bool
                         ) -> tuple[str, bool, LayerKind | None] | None:
    """Why the default plan leaves a linear-shaped weight alone, whether a runtime sees it as a
    Linear (so it goes into ``ignore``), and its kind if it counts as a linear weight."""
    module = module_of(info.name)
    if _HEAD.search(module):
        return ("output head (kept in full precision)", True, None)
    if _EMBEDDING.search(module) or facts.is_embedding(module):
        return ("embedding (a lookup table, not a matmul)", False, None)
    if _is_norm(module):
        return ("norm", False, None)
    if _ROUTER.search(module):
        return ("MoE router (runtimes load it unquantized)", True, LayerKind.OTHER)
    tower = facts.vision_tower(module)
    if tower and not include_vision:
        return (f"{tower} (vision/audio tower or projector, left unquantized by default; --include-vision "
                "quantizes it)", True, LayerKind.VISION)
    return None


def check_tensor_names(tensors: Iterable[TensorInfo]) -> None:
    """Refuse tensor names no real checkpoint has (a safetensors header may hold megabytes of one name):
    checked before planning matches any pattern, ours or the user's, against them."""
    for info in tensors:
        if len(info.name) > MAX_NAME_CHARS:
            raise BadInputError(f"{info.file.name}: tensor name of {len(info.name)} characters (starting "
                                f"{info.name[:60]!r}) is longer than {MAX_NAME_CHARS}: not a tensor name of a real "
                                "checkpoint, refusing it")


def expert_block(module: str, is_3d: bool) -> str | None:
    """The fused-MoE layer a linear weight belongs to: ``...experts`` for a per-expert weight
    (``...experts.3.gate_proj``) or a 3-D expert tensor, None for any other weight.

    vLLM and SGLang build one FusedMoE layer from all experts of a layer, with ONE quantization method
    for all its experts and projections: such a block is quantized whole, in one scheme, or not at all.
    (Shared experts are ordinary linear layers, outside the block.)"""
    if is_3d:
        parent = module.rpartition(".")[0]
        return parent if parent.endswith(".experts") or parent == "experts" else f"{parent}.experts"
    parts = module.rsplit(".", 3)
    if len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit():
        return ".".join([*parts[:-3], "experts"])
    return None


@dataclass
class _Decision:
    """One candidate weight's fate while planning; the plan is assembled from these once every expert
    block has been checked whole."""

    info: TensorInfo
    module: str
    kind: LayerKind | None
    scheme: Scheme | None  # the scheme it is written in; None: left unquantized (``reason``)
    reason: str | None
    runtime_linear: bool
    intended: str  # what the options asked for (a scheme name, or `none (<reason>)`), before shape checks
    split: SplitExperts | None = None
    asked: dict[str, str] = field(default_factory=dict)  # per-expert module → what the options asked (split 3-D)
    block: str | None = None
    refused: bool = False  # 3-D experts that no loader reads quantized, without --keep-fused-experts


def _asked(names: list[str], scheme: Scheme, default: tuple[str, bool, LayerKind | None] | None,
           ignore: list[str], targets: list[str], overrides: list[tuple[str, Scheme | None]]
           ) -> tuple[Scheme | None, str | None]:
    """What the defaults and the user's options decide for a module known under ``names`` (a 3-D expert
    tensor: its stored name and one per-expert name): its scheme, or the reason it stays unquantized.
    A pattern applies if it matches any of the names."""
    def hit(pattern: str) -> bool:
        return any(matches(pattern, name) for name in names)

    targeted = bool(targets) and any(hit(t) for t in targets)
    if not targeted and default is not None:
        return None, default[0]
    if not targeted and targets:
        return None, "not matched by --targets"
    ignored = next((p for p in ignore if hit(p)), None)
    if ignored is not None:
        return None, f"matched --ignore {ignored}"
    override = next(((p, s) for p, s in overrides if hit(p)), None)
    if override is not None and override[1] is None:
        return None, f"--override {override[0]}=none"
    return (override[1] if override is not None else scheme), None


def make_plan(
    checkpoint: Checkpoint,
    scheme: Scheme,
    ignore: list[str] | None = None,
    targets: list[str] | None = None,
    overrides: list[tuple[str, Scheme | None]] | None = None,
    include_vision: bool = False,
    keep_experts: bool = False,
) -> Plan:
    """Decide every tensor's fate. ``overrides`` give matching modules another scheme (``None``: keep
    them unquantized); the first matching override wins. ``include_vision`` quantizes the towers of
    multimodal models; ``keep_experts`` accepts 3-D fused experts left in full precision, which are
    refused otherwise (they are most of an MoE's weights).

    Patterns are matched against the checkpoint's module names and, for 3-D expert tensors written per
    expert, against each per-expert name too (``experts.0.gate_proj``). An expert block (one layer's
    experts: see :func:`expert_block`) gets one fate: options that would split it are refused with its
    parts named; a part the scheme cannot quantize (an input size that is not a multiple of the group
    size) leaves the whole block unquantized, every part saying why."""
    check_tensor_names(checkpoint.tensors.values())
    ignore = compile_patterns(list(ignore or []), "--ignore")
    targets = compile_patterns(list(targets or []), "--targets")
    overrides = list(overrides or [])
    compile_patterns([pattern for pattern, _ in overrides], "--override")
    facts = facts_from_config(checkpoint.config)
    decisions: list[_Decision] = []
    for info in checkpoint.tensors.values():
        if _not_a_candidate(info, facts):
            continue
        decisions.append(_decide(info, facts, scheme, ignore, targets, overrides, include_vision, keep_experts))
    refused = [d for d in decisions if d.refused]
    blocks: dict[str, list[_Decision]] = {}
    for decision in decisions:
        if decision.block is not None:
            blocks.setdefault(decision.block, []).append(decision)
    plan = Plan(scheme=scheme, quantize={}, facts=facts)
    if refused:
        for decision in decisions:
            _add(plan, decision)
        raise BadInputError(_experts_refusal(checkpoint, facts, [_skipped(d) for d in refused], plan))
    for block, members in blocks.items():
        _settle_block(block, members)
    for decision in decisions:
        _add(plan, decision)
    plan.expert_blocks = {block: _block_scheme(members) for block, members in blocks.items()}
    if not plan.quantize and not plan.splits:
        raise BadInputError(f"{checkpoint.root}: no tensor to quantize: {_skip_summary(plan.skipped)}")
    plan.ignore = _ignore_list(checkpoint, plan)
    return plan


def _decide(info: TensorInfo, facts: ModelFacts, scheme: Scheme, ignore: list[str], targets: list[str],
            overrides: list[tuple[str, Scheme | None]], include_vision: bool, keep_experts: bool) -> _Decision:
    """One candidate weight's fate, before its expert block (if any) is checked whole."""
    module = module_of(info.name) if info.name.endswith(".weight") else info.name
    is_3d = is_expert_3d(info.name, info.shape)
    default = _default_skip_reason(info, facts, include_vision)
    kind: LayerKind | None = layer_kind(module, facts)
    runtime_linear = True
    if default is not None:
        runtime_linear = default[1]
        if not (targets and any(matches(t, module) for t in targets)):
            kind = default[2]
    split = None if keep_experts else expert_split(facts.model_type, info.name, info.shape)
    block = expert_block(module, is_3d)
    if split is not None:
        per_expert = split.modules(info.name, info.shape[0])
        asked = {m: _asked([module, m], scheme, default, ignore, targets, overrides) for m in per_expert}
    else:
        asked = {module: _asked([module], scheme, default, ignore, targets, overrides)}
    # Per-expert names that the options give different fates are refused with the rest of their block.
    described = {m: _describe(s, r) for m, (s, r) in asked.items()}
    assert block is not None or len(described) == 1
    chosen, reason = next(iter(asked.values()))
    decision = _Decision(info, module, kind, None, reason, runtime_linear, next(iter(described.values())),
                         block=block, asked=described if split is not None else {})
    if reason is not None:
        if is_3d:
            decision.runtime_linear, decision.kind = False, LayerKind.EXPERTS
        return decision
    assert chosen is not None
    if split is not None and (split.formats is None or isinstance(chosen.format, split.formats)):
        candidate = SplitExperts(info.name, split, chosen, info.shape)
        decision.runtime_linear, decision.kind = False, LayerKind.EXPERTS
        decision.reason = next((f"per-expert {part.leaf} {list(shape)}: {problem}"
                                for part, shape in zip(split.parts, candidate.part_shapes, strict=True)
                                if (problem := shape_problem(shape, chosen))), None)
        if decision.reason is None:
            decision.scheme, decision.split = chosen, candidate
        return decision
    problem = _layout_problem(info, facts, keep_experts, chosen)
    if problem is not None:
        decision.reason, decision.kind = problem
        decision.runtime_linear = runtime_linear and len(info.shape) == 2
        decision.refused = is_3d and not keep_experts
        return decision
    decision.reason = shape_problem(info.shape, chosen)
    if decision.reason is None:
        decision.scheme = chosen
    return decision


def _describe(scheme: Scheme | None, reason: str | None) -> str:
    return scheme.name if scheme is not None else f"none ({reason})"


def _leaf_in(block: str, module: str) -> str:
    return module.removeprefix(f"{block}.") if module.startswith(f"{block}.") else module.rpartition(".")[2]


def _split_refusal(block: str, asked: dict[str, str]) -> str:
    """One line naming the parts of an expert block that the options would give different fates."""
    by_fate: dict[str, list[str]] = {}
    for module, fate in asked.items():
        by_fate.setdefault(fate, []).append(_leaf_in(block, module))
    detail = "; ".join(f"{', '.join(parts[:3])}{f' and {len(parts) - 3} more' if len(parts) > 3 else ''} -> {fate}"
                       for fate, parts in sorted(by_fate.items(), key=lambda kv: len(kv[1])))
    return (f"{block}: vLLM and SGLang load all experts of this layer (every gate/up/down) as one fused-MoE layer "
            f"with one scheme, but the options would give {detail}; give the whole block one scheme, e.g. "
            f"--override 're:^{re.escape(block)}\\..*=SCHEME' (or none)")


def _settle_block(block: str, members: list[_Decision]) -> None:
    """Give an expert block one fate: refuse options that split it, leave it whole unquantized when a
    part cannot be quantized (each quantized part then says which part and why)."""
    asked: dict[str, str] = {}
    for member in members:
        asked.update(member.asked or {member.module: member.intended})
    if len(set(asked.values())) > 1:
        raise BadInputError(_split_refusal(block, asked))
    stuck = next((m for m in members if m.scheme is None), None)
    if stuck is None or all(m.scheme is None for m in members):
        return
    # The same words for every layer, so that the skip report sums them up as one reason.
    why = (f"expert block left unquantized whole (vLLM and SGLang load all experts of a layer as one fused-MoE "
           f"layer, in one scheme): its {stuck.module.rpartition('.')[2]} cannot be quantized: {stuck.reason}")
    for member in members:
        if member.scheme is not None:
            member.scheme, member.split, member.reason = None, None, why


def _block_scheme(members: list[_Decision]) -> str | None:
    return members[0].scheme.name if members[0].scheme is not None else None


def _skipped(decision: _Decision) -> SkippedLayer:
    assert decision.reason is not None
    return SkippedLayer(decision.module, decision.info.shape, decision.reason, decision.runtime_linear, decision.kind)


def _add(plan: Plan, decision: _Decision) -> None:
    if decision.split is not None:
        plan.splits[decision.info.name] = decision.split
    elif decision.scheme is not None:
        plan.quantize[decision.info.name] = decision.scheme
    else:
        plan.skipped.append(_skipped(decision))
    _count(plan, decision.kind, decision.info.numel, quantized=decision.scheme is not None)


def _count(plan: Plan, kind: LayerKind | None, params: int, quantized: bool) -> None:
    if kind is None:
        return
    done, total = plan.linear_params.get(kind.value, (0, 0))
    plan.linear_params[kind.value] = (done + (params if quantized else 0), total + params)


def _skip_summary(skipped: list[SkippedLayer]) -> str:
    """``every candidate was skipped`` made specific: how many weights, for which reasons."""
    if not skipped:
        return "it holds no floating-point linear weight"
    counts = Counter(s.reason for s in skipped)
    parts = [f"{count} x {reason}" for reason, count in counts.most_common(4)]
    if len(counts) > 4:
        parts.append(f"{len(counts) - 4} other reasons (see --dry-run)")
    return "every linear weight is left unquantized: " + "; ".join(parts)


def _experts_refusal(checkpoint: Checkpoint, facts: ModelFacts, refused: list[SkippedLayer], plan: Plan) -> str:
    params = sum(_numel(s.shape) for s in refused)
    total = sum(t for _, t in plan.linear_params.values()) or 1
    example = refused[0]
    return (f"{checkpoint.root}: {len(refused)} 3-D fused expert tensors ({facts.model_type}, e.g. {example.module} "
            f"{list(example.shape)}, {100 * params / total:.0f}% of the linear parameters) cannot be quantized: "
            f"{example.reason.removeprefix('3-D fused experts: ')}; pass --keep-fused-experts to keep them in full "
            "precision (coverage drops accordingly), or --ignore them")


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def shape_problem(shape: tuple[int, ...], scheme: Scheme) -> str | None:
    """Why ``scheme`` cannot quantize a weight of this shape, or None. Blocks pad; groups cannot."""
    in_features = shape[-1]
    if scheme.args.grouped and scheme.group_size and in_features % scheme.group_size:
        return f"input size {in_features} is not a multiple of the group size {scheme.group_size}"
    return None


# The spellings a module of a multimodal model takes in the hub checkpoint, in transformers 5 and in
# vLLM (`language_model.model.*`): an `ignore` entry must match all of them.
_TEXT_PREFIXES = r"(?:model\.language_model\.|language_model\.model\.|language_model\.|model\.)?"
_TEXT_PREFIX = re.compile(r"^(model\.language_model\.|language_model\.model\.|language_model\.|model\.)")


def _portable_entry(module: str, facts: ModelFacts) -> str:
    if not facts.multimodal:
        return module
    stem = _TEXT_PREFIX.sub("", module)
    return f"re:^{_TEXT_PREFIXES}{re.escape(stem)}$"


def _ignore_list(checkpoint: Checkpoint, plan: Plan) -> list[str]:
    facts = plan.facts
    names: set[str] = set()
    towers: set[str] = set()
    quantized_modules = {module_of(name) for name in plan.quantize}
    for experts, block_scheme in plan.expert_blocks.items():
        if block_scheme is None:
            # An unquantized expert block: engines build one fused-MoE layer (`...experts`) for it, which must be
            # ignored too, or vLLM allocates quantized expert parameters that nothing on disk fills.
            names.add(_portable_entry(experts, facts))
            # vLLM asks about a fused-MoE layer through its first expert's separate names (`experts.0.gate_proj`).
            names.add(rf"re:^(model\.)?{re.escape(experts.removeprefix('model.'))}\.\d+\.[^.]+$")
    for skipped in plan.skipped:
        if len(skipped.shape) == 3 and skipped.kind == LayerKind.EXPERTS:
            continue  # a stored 3-D expert tensor: its block's entries above name it
        if not skipped.runtime_linear:
            continue
        tower = facts.vision_tower(skipped.module)
        if tower and not any(facts.vision_tower(m) == tower for m in quantized_modules):
            towers.add(tower)  # the whole tower is unquantized: one entry covers it under any spelling
        elif skipped.module == "lm_head" or skipped.module.endswith(".lm_head"):
            names.add("lm_head")
        else:
            names.add(_portable_entry(skipped.module, facts))
    architectures = (checkpoint.config or {}).get("architectures") or []
    # A tied head has no tensor of its own, but the runtime still builds an lm_head Linear.
    # (Unless --targets quantized the head: ignore never names a quantized module.)
    if any(str(a).endswith(_HEAD_ARCHITECTURES) for a in architectures) and "lm_head" not in quantized_modules:
        names.add("lm_head")
    # A masked-LM head tied to the embeddings (BERT's cls.predictions.decoder, RoBERTa's
    # lm_head.decoder) has no tensor either, and is a Linear in the runtime too.
    if any(str(a).endswith("ForMaskedLM") for a in architectures):
        names.add(r"re:^(.*\.)?(predictions|lm_head)\.decoder$")
    if "lm_head" in names and facts.multimodal:
        names.add(r"re:^language_model\.lm_head$")  # vLLM's spelling for Llava-style models
    entries = sorted(names, key=lambda n: (n != "lm_head", n))
    return entries + [vision_ignore_pattern(tower) for tower in sorted(towers)]


def check_coverage(plan: Plan, minimum: float | None) -> None:
    """``--min-coverage``: refuse a plan that quantizes too small a share of the linear parameters."""
    if minimum is None:
        return
    if not 0 <= minimum <= 1:
        raise BadInputError(f"--min-coverage {minimum}: must be a fraction between 0 and 1")
    coverage = plan.coverage
    share = coverage["share"] or 0.0
    if share < minimum:
        worst = sorted(((k, v) for k, v in coverage["by_kind"].items() if v["share"] is not None and v["share"] < 1),
                       key=lambda kv: kv[1]["linear_params"] - kv[1]["quantized_params"], reverse=True)
        detail = ", ".join(f"{k} {100 * v['share']:.1f}%" for k, v in worst[:3])
        raise BadInputError(f"coverage {100 * share:.1f}% of linear parameters is below --min-coverage "
                            f"{100 * minimum:.1f}% ({detail or 'nothing left out'}; see --dry-run for the reasons)")
