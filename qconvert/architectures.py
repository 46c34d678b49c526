"""What a checkpoint's architecture says about its tensors, read from ``config.json``.

A safetensors file has no module types, so names and shapes alone mislead: GPT-2's ``Conv1D``
weights are stored ``[in, out]``, T5's ``relative_attention_bias`` is an embedding, GraniteMoE's
router is ``router.layer``, gpt-oss and GraniteMoE keep their experts as 3-D tensors, and
multimodal models carry vision towers that common practice leaves unquantized. This module turns
``architectures``, ``model_type`` and the sub-configs into the facts planning needs: which module
leaves are transposed or are embeddings, where the vision towers are, and which modules a runtime
fuses (and so must share one per-tensor scale).

The tables below are ours; where transformers is installed, its modeling source for the model type
is also scanned (read as text, never imported) for ``Conv1D`` and ``nn.Embedding`` attributes, so
architectures not listed here are still read correctly.
"""

from __future__ import annotations

import enum
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from qconvert.formats.base import WeightFormat
from qconvert.formats.tiled import PackQuantized


class LayerKind(str, enum.Enum):
    """What a linear-like weight does; coverage is reported per kind."""

    ATTENTION = "attention"
    MLP = "mlp"
    EXPERTS = "experts"
    VISION = "vision"
    OTHER = "other"


# transformers' GPT-2 family builds these with Conv1D (weight [in, out]).
_CONV1D_LEAVES = {
    "gpt2": {"c_attn", "c_proj", "c_fc", "q_attn"},
    "openai-gpt": {"c_attn", "c_proj", "c_fc"},
    "imagegpt": {"c_attn", "c_proj", "c_fc", "q_attn"},
    "decision_transformer": {"c_attn", "c_proj", "c_fc", "q_attn"},
    "clvp": {"c_attn", "c_proj", "c_fc"},
}
# Embedding tables whose names do not say "embed" (looked up, never multiplied).
_EMBEDDING_LEAVES = {"relative_attention_bias", "wte", "wpe", "shared"}
# 3-D fused expert tensors: [experts, ...] stacked in one tensor per projection.
_EXPERTS_3D = re.compile(r"(^|\.)(experts\.(gate_up_proj|down_proj|gate_proj|up_proj)|"
                         r"(input_linear|output_linear))(\.weight)?$")
# Towers and projectors of multimodal models, as the hub checkpoints and transformers 5 name them.
VISION_TOWERS = ("visual", "vision_tower", "vision_model", "multi_modal_projector", "audio_tower",
                 "vision_embed_tokens", "image_newline", "mm_projector", "audio_encoder")
_VISION = re.compile(r"(^|\.)(" + "|".join(VISION_TOWERS) + r")(\.|$)")

_ATTENTION = re.compile(r"(^|\.)(self_attn|cross_attn|attn|attention|self_attention|SelfAttention|EncDecAttention|"
                        r"q_proj|k_proj|v_proj|o_proj|qkv_proj|query_key_value|dense_attn)(\.|$)")
_EXPERTS = re.compile(r"(^|\.)(experts|shared_experts?|block_sparse_moe\.(input|output)_linear)(\.|$)")
_MLP = re.compile(r"(^|\.)(mlp|feed_forward|ffn|DenseReluDense|intermediate|output|fc1|fc2|c_fc|"
                  r"dense_h_to_4h|dense_4h_to_h|gate_proj|up_proj|down_proj|gate_up_proj|w1|w2|w3)(\.|$)")



@dataclass(frozen=True)
class Fusion:
    """Separate checkpoint layers that vLLM and SGLang load as one matrix (QKVParallelLinear,
    MergedColumnParallelLinear): they share one per-tensor scale in fp8-tensor, must share one scheme, and
    where the engines give the fused layer a name of its own (``fused_leaf``), a config's targets and
    ``ignore`` entries must name it too (SGLang matches them against the fused name for models without a
    packed-modules map, e.g. Llama)."""

    parent: str  # regex of the module holding the parts
    parts: tuple[str, ...]
    fused_leaf: str | None = None
    mla_only: bool = False  # DeepSeek-V2/V3 MLA with a low-rank query only

    @property
    def pattern(self) -> str:
        """A regex over module names whose first group names the fused module."""
        return rf"^({self.parent})\.(?:{'|'.join(self.parts)})$"


# The one fusion map: planning (shared fp8-tensor scales), the config writer (fused names in targets and
# ignore) and the split-layer check all read it.
FUSIONS = (
    Fusion(r".*\.self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
    Fusion(r".*\.attention\.self", ("query", "key", "value")),
    Fusion(r".*\.(?:mlp|experts\.\d+|shared_experts?)", ("gate_proj", "up_proj"), "gate_up_proj"),
    Fusion(r".*\.experts\.\d+", ("w1", "w3")),
    # DeepSeek-V2/V3 MLA with a low-rank query: vLLM loads these as one `fused_qkv_a_proj`.
    Fusion(r".*\.self_attn", ("q_a_proj", "kv_a_proj_with_mqa"), "fused_qkv_a_proj", mla_only=True),
)
COMMON_FUSIONS = [f.pattern for f in FUSIONS if not f.mla_only]
MLA_FUSION = next(f.pattern for f in FUSIONS if f.mla_only)
# fused leaf name → the leaves it is made of (the engines' packed-modules maps)
ENGINE_FUSIONS: dict[str, tuple[str, ...]] = {f.fused_leaf: f.parts for f in FUSIONS if f.fused_leaf}
_MLA_TYPES = {"deepseek_v2", "deepseek_v3", "deepseek_v32", "kimi_k2", "glm4_moe_lite"}


@dataclass(frozen=True)
class ModelFacts:
    model_type: str | None = None
    architectures: tuple[str, ...] = ()
    conv1d_leaves: frozenset[str] = frozenset()
    embedding_leaves: frozenset[str] = frozenset(_EMBEDDING_LEAVES)
    multimodal: bool = False
    mla_fused: bool = False  # q_a_proj + kv_a_proj_with_mqa are one fused matrix
    tied_embeddings: bool = False
    sub_types: tuple[str, ...] = field(default_factory=tuple)

    def is_conv1d(self, module: str) -> bool:
        return module.rpartition(".")[2] in self.conv1d_leaves

    def is_embedding(self, module: str) -> bool:
        return module.rpartition(".")[2] in self.embedding_leaves

    def vision_tower(self, module: str) -> str | None:
        """The tower a module belongs to (``visual``, ``vision_tower``, ...), for multimodal models."""
        if not self.multimodal:
            return None
        match = _VISION.search(module)
        return match.group(2) if match else None

    @property
    def fused_patterns(self) -> list[str]:
        return [*COMMON_FUSIONS, MLA_FUSION] if self.mla_fused else list(COMMON_FUSIONS)


def is_expert_3d(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and _EXPERTS_3D.search(name) is not None


# ---------------------------------------------------------------- 3-D experts, cut per expert

Cut = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExpertPart:
    """One per-expert linear weight cut out of a 3-D expert tensor."""

    leaf: str  # the per-expert module's leaf: `{experts}.{e}.{leaf}`
    cut: Cut  # one expert's 2-D slice of the stored tensor -> this part's [out, in] weight


@dataclass(frozen=True)
class ExpertSplit:
    """How an architecture's 3-D expert tensor becomes per-expert ``[out, in]`` linear weights, named as
    the loader that reads them expects. ``vllm_spelling``: the per-expert tensors are named as vLLM's
    model class streams them into its fused-MoE parameters (``experts.3.w13_weight_packed``), not as
    compressed-tensors modules (``experts.3.w13.weight_packed``); such a layout has no ``weight_shape``."""

    model_type: str
    source: re.Pattern[str]  # the stored tensor; group 1 + ``experts``: the experts' module
    experts: str  # appended to group 1: ``{group 1}{experts}.{e}.{leaf}`` names each per-expert layer
    parts: tuple[ExpertPart, ...]
    formats: tuple[type[WeightFormat], ...] | None = None  # formats a loader reads this way; None: all
    vllm_spelling: bool = False
    why: str = ""  # where the layout comes from (for notes)

    def modules(self, tensor: str, experts: int) -> list[str]:
        match = self.source.search(tensor)
        assert match is not None
        return [f"{match.group(1)}{self.experts}.{e}.{part.leaf}" for e in range(experts) for part in self.parts]

    def part_shape(self, part: ExpertPart, shape: tuple[int, ...]) -> tuple[int, ...]:
        """A part's [out, in], computed by cutting a tensor that holds no data."""
        return tuple(part.cut(torch.empty(shape[1:], device="meta")).shape)


def _first_half(weight: torch.Tensor) -> torch.Tensor:
    return weight[: weight.shape[0] // 2]


def _second_half(weight: torch.Tensor) -> torch.Tensor:
    return weight[weight.shape[0] // 2:]


def _as_stored(weight: torch.Tensor) -> torch.Tensor:
    return weight


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    return weight.t()


# GraniteMoE's ParallelExperts keep [experts, out, in] (hub name `input_linear.weight`, transformers 5's in-memory
# name `experts.gate_up_proj`; vLLM reads both): `input_linear` is gate then up (transformers'
# GraniteMoeMoE chunks its output in two, the first half through the activation), `output_linear` is down.
# Written as Mixtral-style per-expert modules, which vLLM's fused-MoE loader maps onto w13 (gate, up) and w2.
# gpt-oss keeps [experts, in, out] with gate and up interleaved in `gate_up_proj`'s columns; vLLM's
# GptOssForCausalLM loads quantized experts one at a time as `experts.<e>.w13_weight_packed` (w13: the
# transposed [2 x intermediate, hidden], rows still interleaved, as its activation reads them) and
# `experts.<e>.w2_weight_packed`, for its weight-only int (WNA16) MoE method only.
EXPERT_SPLITS: dict[str, tuple[ExpertSplit, ...]] = {
    "granitemoe": (
        ExpertSplit("granitemoe",
                    re.compile(r"^(.*\.block_sparse_moe)\.(?:input_linear\.weight|experts\.gate_up_proj)$"), ".experts",
                    (ExpertPart("gate_proj", _first_half), ExpertPart("up_proj", _second_half)),
                    why="vLLM's fused-MoE loader reads per-expert gate_proj/up_proj/down_proj"),
        ExpertSplit("granitemoe",
                    re.compile(r"^(.*\.block_sparse_moe)\.(?:output_linear\.weight|experts\.down_proj)$"), ".experts",
                    (ExpertPart("down_proj", _as_stored),),
                    why="vLLM's fused-MoE loader reads per-expert gate_proj/up_proj/down_proj"),
    ),
    "gpt_oss": (
        ExpertSplit("gpt_oss", re.compile(r"^(.*\.mlp\.experts)\.gate_up_proj$"), "", (ExpertPart("w13", _transposed),),
                    formats=(PackQuantized,), vllm_spelling=True,
                    why="vLLM's GptOssForCausalLM streams per-expert w13/w2 for weight-only int schemes; its and "
                        "SGLang's NVFP4 and FP8 MoE methods hold no expert biases"),
        ExpertSplit("gpt_oss", re.compile(r"^(.*\.mlp\.experts)\.down_proj$"), "", (ExpertPart("w2", _transposed),),
                    formats=(PackQuantized,), vllm_spelling=True,
                    why="vLLM's GptOssForCausalLM streams per-expert w13/w2 for weight-only int schemes; its and "
                        "SGLang's NVFP4 and FP8 MoE methods hold no expert biases"),
    ),
}
# The architecture families whose experts these splits write (the serving table keys them apart: no
# transformers release loads them).
SPLIT_EXPERT_FAMILIES = tuple(EXPERT_SPLITS)


def expert_split(model_type: str | None, name: str, shape: tuple[int, ...]) -> ExpertSplit | None:
    """The split for a stored 3-D expert tensor of this architecture, or None where none is known."""
    if len(shape) != 3:
        return None
    return next((s for s in EXPERT_SPLITS.get(model_type or "", ()) if s.source.search(name)), None)


def layer_kind(module: str, facts: ModelFacts) -> LayerKind:
    if facts.vision_tower(module):
        return LayerKind.VISION
    if _EXPERTS.search(module):
        return LayerKind.EXPERTS
    if _ATTENTION.search(module):
        return LayerKind.ATTENTION
    if _MLP.search(module):
        return LayerKind.MLP
    return LayerKind.OTHER


def vision_ignore_pattern(tower: str) -> str:
    """An ``ignore`` entry for a whole tower that matches before and after the loaders' renames
    (``visual.*`` in the hub checkpoint, ``model.visual.*`` in transformers 5)."""
    return rf"re:^(.*\.)?{tower}\..*"


def _sub_configs(config: dict) -> list[dict]:
    return [value for key, value in config.items()
            if key.endswith("_config") and isinstance(value, dict) and key != "quantization_config"]


def facts_from_config(config: dict | None) -> ModelFacts:
    config = config or {}
    model_type = config.get("model_type")
    subs = _sub_configs(config)
    types = [t for t in [model_type, *(s.get("model_type") for s in subs)] if isinstance(t, str)]
    conv1d: set[str] = set()
    embeddings = set(_EMBEDDING_LEAVES)
    for kind in types:
        conv1d |= _CONV1D_LEAVES.get(kind, set())
        scanned_conv1d, scanned_embeddings = _scan_modeling_source(kind)
        conv1d |= scanned_conv1d
        embeddings |= scanned_embeddings
    multimodal = any(key in config for key in ("vision_config", "audio_config", "visual"))
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    mla = (any(t in _MLA_TYPES for t in types) and text.get("q_lora_rank") is not None)
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    return ModelFacts(
        model_type=model_type, architectures=tuple(str(a) for a in config.get("architectures") or []),
        conv1d_leaves=frozenset(conv1d), embedding_leaves=frozenset(embeddings), multimodal=multimodal,
        mla_fused=mla, tied_embeddings=tied, sub_types=tuple(types[1:]),
    )


_CONV1D_ATTR = re.compile(r"self\.(\w+)\s*=\s*Conv1D\(")
_EMBEDDING_ATTR = re.compile(r"self\.(\w+)\s*=\s*nn\.Embedding\(")


@lru_cache(maxsize=64)
def _scan_modeling_source(model_type: str) -> tuple[frozenset[str], frozenset[str]]:
    """Attribute names built with ``Conv1D`` / ``nn.Embedding`` in transformers' modeling file for
    ``model_type``, read as text (importing it would cost seconds); empty where it is not installed."""
    if not re.fullmatch(r"[\w-]+", model_type):
        return frozenset(), frozenset()
    try:
        spec = importlib.util.find_spec("transformers")
    except (ImportError, ValueError):
        return frozenset(), frozenset()
    if spec is None or not spec.submodule_search_locations:
        return frozenset(), frozenset()
    folder = model_type.replace("-", "_")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / folder / f"modeling_{folder}.py"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return frozenset(), frozenset()
    return frozenset(_CONV1D_ATTR.findall(text)), frozenset(_EMBEDDING_ATTR.findall(text))
