"""Planning: which tensor gets which scheme, decided from names, shapes and dtypes alone.

A checkpoint has no module types, so "linear layer" is inferred: a 2-D floating-point ``*.weight``
that is not an embedding, an output head, a norm or an MoE router. Every linear-looking layer that
is left unquantized is written into the config's ``ignore`` list, so that runtimes which match
``targets: ["Linear"]`` never expect quantized tensors for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from qconvert.checkpoint import Checkpoint
from qconvert.errors import BadInputError
from qconvert.safetensors_io import TensorInfo
from qconvert.schemes import Scheme

_EMBEDDING = re.compile(r"(^|\.)(embed\w*|\w*_embeddings?|embeddings|wte|wpe|shared)$")
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output_layer|predictions\.decoder)$")
_NORM = re.compile(r"(^|\.)(\w*norm\w*|ln_\w+|ln)$", re.IGNORECASE)
_ROUTER = re.compile(r"(^|\.)(gate|router)$")
_HEAD_ARCHITECTURES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForMaskedLM")


@dataclass(frozen=True)
class SkippedLayer:
    module: str
    shape: tuple[int, ...]
    reason: str
    runtime_linear: bool  # a runtime would treat it as a Linear, so it must be in `ignore`


@dataclass
class Plan:
    scheme: Scheme
    quantize: dict[str, Scheme]  # weight tensor name → scheme
    skipped: list[SkippedLayer] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)

    def scheme_for(self, info: TensorInfo) -> Scheme | None:
        return self.quantize.get(info.name)

    @property
    def schemes_by_module(self) -> dict[str, Scheme]:
        return {module_of(name): scheme for name, scheme in self.quantize.items()}


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


def _default_skip_reason(info: TensorInfo) -> tuple[str, bool] | None:
    """Why the default plan leaves a tensor alone, and whether a runtime sees it as a Linear."""
    module = module_of(info.name)
    if not info.name.endswith(".weight"):
        return ("not a weight", False)
    if not info.dtype.is_floating_point:
        return (f"not floating point ({info.dtype})", False)
    if len(info.shape) != 2:
        return (f"{len(info.shape)}-D, not a linear weight", False)
    if _HEAD.search(module):
        return ("output head (kept in full precision)", True)
    if _EMBEDDING.search(module):
        return ("embedding", False)
    if _NORM.search(module):
        return ("norm", False)
    if _ROUTER.search(module):
        return ("MoE router (runtimes load it unquantized)", True)
    return None


def make_plan(
    checkpoint: Checkpoint,
    scheme: Scheme,
    ignore: list[str] | None = None,
    targets: list[str] | None = None,
    overrides: list[tuple[str, Scheme | None]] | None = None,
) -> Plan:
    """Decide every tensor's fate. ``overrides`` give matching modules another scheme (``None``: keep
    them unquantized); the first matching override wins."""
    ignore = compile_patterns(list(ignore or []), "--ignore")
    targets = compile_patterns(list(targets or []), "--targets")
    overrides = list(overrides or [])
    compile_patterns([pattern for pattern, _ in overrides], "--override")
    plan = Plan(scheme=scheme, quantize={})
    for info in checkpoint.tensors.values():
        module = module_of(info.name)
        if targets and any(matches(t, module) for t in targets):
            reason = _targeted_skip_reason(info)
            runtime_linear = False
        else:
            skip = _default_skip_reason(info)
            reason, runtime_linear = skip if skip else (None, True)
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
        if reason is None:
            reason = shape_problem(info.shape, chosen)
        if reason is None:
            plan.quantize[info.name] = chosen
        elif info.name.endswith(".weight") and len(info.shape) == 2:
            plan.skipped.append(SkippedLayer(module, info.shape, reason, runtime_linear))
    if not plan.quantize:
        raise BadInputError(f"{checkpoint.root}: no tensor to quantize (every candidate was skipped)")
    plan.ignore = _ignore_list(checkpoint, plan)
    return plan


def shape_problem(shape: tuple[int, ...], scheme: Scheme) -> str | None:
    """Why ``scheme`` cannot quantize a weight of this shape, or None. Blocks pad; groups cannot."""
    in_features = shape[1]
    if scheme.strategy == "group" and scheme.group_size and in_features % scheme.group_size:
        return f"input size {in_features} is not a multiple of the group size {scheme.group_size}"
    return None


def _targeted_skip_reason(info: TensorInfo) -> str | None:
    """An explicitly targeted tensor still has to be a 2-D float weight."""
    if not info.name.endswith(".weight"):
        return "not a weight"
    if not info.dtype.is_floating_point:
        return f"not floating point ({info.dtype})"
    if len(info.shape) != 2:
        return f"{len(info.shape)}-D, not a linear weight"
    return None


def _ignore_list(checkpoint: Checkpoint, plan: Plan) -> list[str]:
    names = {s.module for s in plan.skipped if s.runtime_linear}
    architectures = (checkpoint.config or {}).get("architectures") or []
    # A tied head has no tensor of its own, but the runtime still builds an lm_head Linear.
    if any(str(a).endswith(_HEAD_ARCHITECTURES) for a in architectures):
        names.add("lm_head")
    return sorted(names, key=lambda n: (n != "lm_head", n))
