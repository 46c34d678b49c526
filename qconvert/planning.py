"""Planning: which tensor gets which scheme, decided from the architecture, names, shapes and dtypes.

A checkpoint has no module types, so "linear layer" is inferred: a 2-D floating-point ``*.weight``
that is not an embedding, an output head, a norm or an MoE router. ``config.json`` refines that
(:mod:`qconvert.architectures`): GPT-2-style ``Conv1D`` weights are stored transposed, some
embeddings are not called embeddings, 3-D fused experts and vision towers are linear weights that
no plain rule sees. Every weight left unquantized gets a reason, and every linear-looking layer left
unquantized is written into the config's ``ignore`` list, so that runtimes which match
``targets: ["Linear"]`` never expect quantized tensors for it.
"""

from __future__ import annotations

import re
from collections import Counter
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
_NORM = re.compile(r"(^|\.)(\w*norm\w*|ln_\w+|ln)$", re.IGNORECASE)
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


def _default_skip_reason(info: TensorInfo, facts: ModelFacts, include_vision: bool
                         ) -> tuple[str, bool, LayerKind | None] | None:
    """Why the default plan leaves a linear-shaped weight alone, whether a runtime sees it as a
    Linear (so it goes into ``ignore``), and its kind if it counts as a linear weight."""
    module = module_of(info.name)
    if _HEAD.search(module):
        return ("output head (kept in full precision)", True, None)
    if _EMBEDDING.search(module) or facts.is_embedding(module):
        return ("embedding (a lookup table, not a matmul)", False, None)
    if _NORM.search(module):
        return ("norm", False, None)
    if _ROUTER.search(module):
        return ("MoE router (runtimes load it unquantized)", True, LayerKind.OTHER)
    tower = facts.vision_tower(module)
    if tower and not include_vision:
        return (f"{tower} (vision/audio tower or projector, left unquantized by default; --include-vision "
                "quantizes it)", True, LayerKind.VISION)
    return None


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
    refused otherwise (they are most of an MoE's weights)."""
    ignore = compile_patterns(list(ignore or []), "--ignore")
    targets = compile_patterns(list(targets or []), "--targets")
    overrides = list(overrides or [])
    compile_patterns([pattern for pattern, _ in overrides], "--override")
    facts = facts_from_config(checkpoint.config)
    plan = Plan(scheme=scheme, quantize={}, facts=facts)
    refused_experts: list[SkippedLayer] = []
    for info in checkpoint.tensors.values():
        if _not_a_candidate(info, facts):
            continue
        module = module_of(info.name) if info.name.endswith(".weight") else info.name
        kind: LayerKind | None = layer_kind(module, facts)
        targeted = bool(targets) and any(matches(t, module) for t in targets)
        if targeted:
            reason, runtime_linear = None, False
        else:
            skip = _default_skip_reason(info, facts, include_vision)
            reason, runtime_linear, kind = skip if skip else (None, True, kind)
            if reason is None and targets:
                reason = "not matched by --targets"
        chosen = scheme
        if reason is None:
            hit = next((p for p in ignore if matches(p, module)), None)
            if hit is not None:
                reason = f"matched --ignore {hit}"
        if reason is None:
            override = next(((p, s) for p, s in overrides if matches(p, module)), None)
            if override is not None and override[1] is None:
                reason = f"--override {override[0]}=none"
            elif override is not None:
                chosen = override[1]
        split = None if keep_experts else expert_split(facts.model_type, info.name, info.shape)
        if reason is None and split is not None and (split.formats is None or isinstance(chosen.format, split.formats)):
            candidate = SplitExperts(info.name, split, chosen, info.shape)
            reason = next((f"per-expert {part.leaf} {list(shape)}: {problem}"
                           for part, shape in zip(split.parts, candidate.part_shapes, strict=True)
                           if (problem := shape_problem(shape, chosen))), None)
            if reason is None:
                plan.splits[info.name] = candidate
                _count(plan, LayerKind.EXPERTS, info.numel, quantized=True)
                continue
            runtime_linear, kind = False, LayerKind.EXPERTS
        if reason is None:
            problem = _layout_problem(info, facts, keep_experts, chosen)
            if problem is not None:
                reason, kind = problem
                runtime_linear = runtime_linear and len(info.shape) == 2
                if len(info.shape) == 3 and not keep_experts:
                    refused_experts.append(SkippedLayer(module, info.shape, reason, False, kind))
        if reason is None:
            reason = shape_problem(info.shape, chosen)
        if reason is None:
            plan.quantize[info.name] = chosen
            _count(plan, kind, info.numel, quantized=True)
        else:
            plan.skipped.append(SkippedLayer(module, info.shape, reason, runtime_linear, kind))
            _count(plan, kind, info.numel, quantized=False)
    if refused_experts:
        raise BadInputError(_experts_refusal(checkpoint, facts, refused_experts, plan))
    if not plan.quantize and not plan.splits:
        raise BadInputError(f"{checkpoint.root}: no tensor to quantize: {_skip_summary(plan.skipped)}")
    plan.ignore = _ignore_list(checkpoint, plan)
    return plan


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
    for skipped in plan.skipped:
        if len(skipped.shape) == 3 and skipped.kind == LayerKind.EXPERTS:
            # Kept 3-D fused experts: engines build one fused-MoE layer (`...experts`) for them, which must be
            # ignored too, or vLLM allocates quantized expert parameters that nothing on disk fills.
            parent = skipped.module.rpartition(".")[0]
            experts = parent if parent.endswith(".experts") else f"{parent}.experts"
            names.add(_portable_entry(experts, facts))
            # vLLM asks about a fused-MoE layer through its first expert's separate names (`experts.0.gate_proj`).
            names.add(rf"re:^(model\.)?{re.escape(experts.removeprefix('model.'))}\.\d+\.[^.]+$")
            continue
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
    if any(str(a).endswith(_HEAD_ARCHITECTURES) for a in architectures):
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
