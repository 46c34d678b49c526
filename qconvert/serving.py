"""Which engine serves which of our outputs: the one table of truth.

Each entry was observed by the conformance tier (``tests/engines/``, ``make engines``), which runs the
engines' own config parsing and weight loaders on checkpoints we write and fails when an engine and this
table disagree. ``qconvert schemes``, the ``serves_in`` field of ``quantize --json`` and the "loads in" table
of docs/schemes.md are all made from it.

An output *kind* is a scheme, optionally with a layout (``int8-block@sglang``) or the ``convert`` op that
produced it (``fp8+fnuz``). Several entries for one engine give the method it picks from each minimum GPU
capability upwards (vLLM falls back to weight-only FP8 below sm89, for instance).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import TYPE_CHECKING

# Nothing here imports torch (architectures and formats do, so they are imported where used): `qconvert
# schemes` reads this table and must start in a fraction of a second.
if TYPE_CHECKING:
    from qconvert.formats.args import Layout


class Engine(str, Enum):
    VLLM = "vllm"
    SGLANG = "sglang"
    TRANSFORMERS = "transformers"
    QCONVERT = "qconvert"  # qconvert's own kernels (`qconvert verify`)


# The versions the conformance tier pins and tests.
VLLM_VERSION = "0.33.0"
SGLANG_VERSION = "0.5.23"
TRANSFORMERS_VERSION = "5.23"


@dataclass(frozen=True)
class Serving:
    engine: Engine
    version: str  # engine version the conformance tier tested
    method: str  # what the engine picks for linear layers
    min_capability: int | None  # lowest CUDA capability (80 = sm80) at which it loads; None: not GPU-bound
    # Architecture families it holds for; "*" = every family whose layers are the checkpoint's own (llama,
    # deepseek), not the per-expert layouts qconvert writes for 3-D experts (SPLIT_FAMILIES: named explicitly).
    families: tuple[str, ...] = ("*",)
    moe_method: str | None = None  # what it picks for MoE experts, where tested
    note: str = ""

    def to_json(self) -> dict:
        data = asdict(self)
        data["engine"] = self.engine.value
        data["families"] = list(self.families)
        return data

    def describe(self) -> str:
        """One phrase for a note: the engine, its version, the method and the capability it needs. The
        families are left out: a note describes entries already chosen for the checkpoint's own family."""
        where = "" if self.min_capability is None else f" sm{self.min_capability}+"
        return " ".join(part for part in (self.engine.value, self.version, f"{self.method}{where}") if part)


def _vllm(method: str, capability: int, moe: str | None = None, **kw: object) -> Serving:
    return Serving(Engine.VLLM, VLLM_VERSION, method, capability, moe_method=moe, **kw)  # type: ignore[arg-type]


def _sglang(method: str, capability: int, moe: str | None = None, **kw: object) -> Serving:
    return Serving(Engine.SGLANG, SGLANG_VERSION, method, capability, moe_method=moe, **kw)  # type: ignore[arg-type]


# SGLang's DeepSeek loader concatenates q_a_proj and kv_a_proj_with_mqa tensors of every name into its fused
# layer, `weight_shape` included ([2] + [2] -> [4]), and the fused layer's weight_shape parameter is [2]: load fails.
_SGLANG_NOT_MLA_PACKED: dict = {"families": ("llama",),
                                "note": "SGLang: DeepSeek MLA fused q_a/kv_a weight_shape fails to load"}

# vLLM's methods for MoE experts, and the per-tensor FP8 entries (Llama family only, see "fp8-tensor").
_VLLM_WNA16_MOE = "CompressedTensorsWNA16MoEMethod"
_VLLM_FP8_MOE = "CompressedTensorsW8A8Fp8MoEMethod"
_VLLM_FP8_TENSOR = (_vllm("CompressedTensorsW8A16Fp8", 75, families=("llama",)),
                    _vllm("CompressedTensorsW8A8Fp8", 89, families=("llama",)))
_TRANSFORMERS = Serving(Engine.TRANSFORMERS, TRANSFORMERS_VERSION, "CompressedTensorsHfQuantizer", None)
# transformers' weight conversion of per-expert MoE tensors fails for int-quantized experts and for fp8 block
# scales of experts larger than one block (tests/arch_matrix.py leaves those out, and says why): dense models only.
_TRANSFORMERS_DENSE = Serving(Engine.TRANSFORMERS, TRANSFORMERS_VERSION, "CompressedTensorsHfQuantizer", None,
                              families=("llama",), note="dense models; MoE experts fail transformers' conversion")
# Zero points: transformers registers them unpacked and refuses compressed-tensors' packed ones on its default path;
# with CompressedTensorsConfig(dequantize=True) it loads them, dense layers only (tests/arch_matrix.py).
_TRANSFORMERS_ASYM = Serving(Engine.TRANSFORMERS, TRANSFORMERS_VERSION, "CompressedTensorsHfQuantizer", None,
                             families=("llama",), note="dense models, with CompressedTensorsConfig(dequantize=True) "
                                                       "only; MoE experts fail transformers' conversion")
_QCONVERT = Serving(Engine.QCONVERT, "", "verify (Triton kernels)", None)
# GraniteMoE's per-expert layers are compressed-tensors modules, which verify checks (gpt-oss's, in vLLM's own
# spelling, it names as not verified).
_QCONVERT_WITH_GRANITE = Serving(Engine.QCONVERT, "", "verify (Triton kernels)", None, families=("*", "granitemoe"))

# gpt-oss and GraniteMoE keep their experts in 3-D tensors; qconvert writes them per expert in the layout vLLM's
# loaders read (architectures.EXPERT_SPLITS), which no transformers release loads. vLLM loads gpt-oss's only in
# weight-only int schemes (qconvert refuses the others); GraniteMoE's as it loads Mixtral's.
SPLIT_FAMILIES = ("gpt_oss", "granitemoe")
FAMILIES = ("llama", "deepseek", *SPLIT_FAMILIES)
_WITH_SPLIT: dict = {"families": ("*", *SPLIT_FAMILIES)}
_WITH_GRANITE: dict = {"families": ("*", "granitemoe")}

# NVFP4 / MX: vLLM picks its W4A4 / W8A8 classes for the A16 presets too; SGLang has no dense MX scheme.
_VLLM_NVFP4_MOE = "CompressedTensorsW4A4Nvfp4MoEMethod"
_SGLANG_NVFP4: dict = {"families": ("llama",),
                       "note": "SGLang: DeepSeek MLA fused q_a/kv_a weight_global_scale [1]+[1] fails to load; "
                               "NVFP4 MoE needs hidden % 128 == 0 and expert intermediate % 64 == 0"}
# transformers computes NVFP4 MoE experts wrongly (llm-compressor's identical bytes too; tests/arch_matrix.py).
_TRANSFORMERS_NVFP4 = Serving(Engine.TRANSFORMERS, TRANSFORMERS_VERSION, "CompressedTensorsHfQuantizer", None,
                              families=("llama",), note="dense models; NVFP4 MoE experts compute wrongly")

SERVES: dict[str, tuple[Serving, ...]] = {
    "rtn4": (_vllm("CompressedTensorsWNA16", 75, _VLLM_WNA16_MOE, **_WITH_SPLIT),
             _sglang("CompressedTensorsWNA16", 80, **_SGLANG_NOT_MLA_PACKED), _TRANSFORMERS, _QCONVERT_WITH_GRANITE),
    "rtn8": (_vllm("CompressedTensorsWNA16", 75, _VLLM_WNA16_MOE, **_WITH_SPLIT),
             _sglang("CompressedTensorsWNA16", 80, **_SGLANG_NOT_MLA_PACKED), _TRANSFORMERS, _QCONVERT_WITH_GRANITE),
    "w8a8-int8": (_vllm("CompressedTensorsW8A8Int8", 75, "CompressedTensorsW8A8Int8MoEMethod"),
                  _sglang("CompressedTensorsW8A8Int8", 80, families=("llama",),
                          note="SGLang: int8 MoE experts only on NPU (DeepSeek refused)"), _TRANSFORMERS_DENSE,
                  _QCONVERT_WITH_GRANITE),
    "fp8": (_vllm("CompressedTensorsW8A16Fp8", 75, _VLLM_FP8_MOE, **_WITH_GRANITE),
            _vllm("CompressedTensorsW8A8Fp8", 89, _VLLM_FP8_MOE, **_WITH_GRANITE),
            _sglang("CompressedTensorsW8A16Fp8", 80, "CompressedTensorsW8A8Fp8MoE"),
            _sglang("CompressedTensorsW8A8Fp8", 89, "CompressedTensorsW8A8Fp8MoE"), _TRANSFORMERS,
            _QCONVERT_WITH_GRANITE),
    "fp8-block": (_vllm("CompressedTensorsW8A16Fp8", 75, _VLLM_FP8_MOE, **_WITH_GRANITE),
                  _vllm("CompressedTensorsW8A8Fp8", 89, _VLLM_FP8_MOE, **_WITH_GRANITE),
                  _sglang("CompressedTensorsW8A8Fp8", 89, "CompressedTensorsW8A8Fp8MoE"), _TRANSFORMERS_DENSE,
                  _QCONVERT_WITH_GRANITE),
    # vLLM's FP8 MoE method takes per-tensor weights only with static per-tensor activations (a bare
    # AssertionError in CompressedTensorsW8A8Fp8MoEMethod otherwise): DeepSeek-family MoE models do not load.
    "fp8-tensor": (*_VLLM_FP8_TENSOR,
                   _sglang("CompressedTensorsW8A16Fp8", 80, families=("llama",)),
                   _sglang("CompressedTensorsW8A8Fp8", 89, families=("llama",),
                           note="SGLang's fp8 MoE takes tensor weights only with static tensor activations"),
                   _TRANSFORMERS, _QCONVERT_WITH_GRANITE),
    "nvfp4": (_vllm("CompressedTensorsW4A4Fp4", 75, _VLLM_NVFP4_MOE, **_WITH_GRANITE,
                    note="vLLM: weight-only at every capability (Marlin; FlashInfer CuTe-DSL W4A16 on sm100)"),
              _sglang("CompressedTensorsW4A16Fp4", 80, "CompressedTensorsW4A16Nvfp4MoE", **_SGLANG_NVFP4),
              _TRANSFORMERS_NVFP4, _QCONVERT_WITH_GRANITE),
    "mxfp4": (_vllm("CompressedTensorsW4A4Mxfp4", 80, "CompressedTensorsW4A4Mxfp4MoEMethod", **_WITH_GRANITE,
                    note="vLLM quantizes activations to MXFP4 on sm100+ (FlashInfer / CUTLASS) whatever the "
                         "config says; SGLang has no compressed-tensors MXFP4 linear scheme"),
              _TRANSFORMERS, _QCONVERT_WITH_GRANITE),
    "mxfp8": (_vllm("CompressedTensorsW8A8Mxfp8", 75, "CompressedTensorsW8A8Mxfp8MoEMethod", **_WITH_GRANITE,
                    note="vLLM quantizes activations to MXFP8 on sm100+ (FlashInfer) whatever the config says; "
                         "SGLang has no compressed-tensors MXFP8 linear scheme"),
              _TRANSFORMERS_DENSE, _QCONVERT_WITH_GRANITE),
    # Zero points (W4A16_ASYM / W8A16_ASYM). vLLM's WNA16 method registers weight_zero_point; its kernel chooser
    # picks Marlin (uint4 with zero points) from sm75 and Machete at sm90, Humming where neither takes the
    # layer (uint8 with zero points below sm90; Machete needs in % 64 == 0 and out % 128 == 0). Its MoE method
    # loads int4 zero points (Marlin experts); no WNA16 MoE backend of vLLM takes int8 zero points. SGLang loads
    # dense layers with zero points into CompressedTensorsWNA16 (Marlin: uint4 only, so not int8-asym); its MoE
    # method fails to load expert zero points (tests/engines/test_sglang.py).
    "int4-asym": (_vllm("CompressedTensorsWNA16", 75, _VLLM_WNA16_MOE,
                        note="vLLM kernels: Marlin sm75-89, Machete sm90 (Humming for shapes Machete refuses); "
                             "MoE experts Marlin"),
                  _sglang("CompressedTensorsWNA16", 80, families=("llama",),
                          note="SGLang: dense models only (its WNA16 MoE fails to load expert zero points; DeepSeek "
                               "MLA fused q_a/kv_a weight_shape fails too)"),
                  _TRANSFORMERS_ASYM, _QCONVERT),
    "int8-asym": (_vllm("CompressedTensorsWNA16", 75, families=("llama",),
                        note="vLLM: dense models only (no vLLM WNA16 MoE backend takes int8 zero points: "
                             "DeepSeek refused); kernels Humming sm75-89, Machete sm90. SGLang's Marlin takes no "
                             "int8 zero points"),
                  _TRANSFORMERS_ASYM, _QCONVERT),
    # No engine accepts int8 weights with block scales through compressed-tensors.
    "int8-block": (_TRANSFORMERS_DENSE, _QCONVERT_WITH_GRANITE),
    # SGLang's blockwise_int8 reaches the scales only where the model's loader keeps `weight_scale_inv`.
    "int8-block@sglang": (_sglang("BlockInt8LinearMethod", 80, "BlockInt8MoEMethod", families=("deepseek",)),
                          _QCONVERT),
    # Per-tensor scales made equal across q/k/v and gate/up: SGLang loads it as it loads fp8-tensor.
    "fp8-tensor+shared-scale": (*_VLLM_FP8_TENSOR, _sglang("CompressedTensorsW8A16Fp8", 80, families=("llama",)),
                                _sglang("CompressedTensorsW8A8Fp8", 89, families=("llama",))),
    # Values as stored; vLLM and SGLang load plain e4m3fn and normalize to fnuz on ROCm themselves.
    "fp8+fnuz": (_QCONVERT,),
    "fp8-block+fnuz": (_QCONVERT,),
    "fp8-tensor+fnuz": (_QCONVERT,),
}


def output_kind(scheme: str, layout: Layout | str = "compressed-tensors", op: str | None = None) -> str:
    value = getattr(layout, "value", layout)  # a Layout or its value, read without importing formats (torch)
    if value not in ("compressed-tensors", "sglang"):
        raise ValueError(f"{value!r} is not a valid Layout")
    kind = scheme if value == "compressed-tensors" else f"{scheme}@{value}"
    return f"{kind}+{op}" if op else kind


def serving_for(kind: str, family: str = "llama") -> list[Serving]:
    """The engines that serve ``kind`` for an architecture ``family`` (empty when none is known)."""
    return [s for s in SERVES.get(kind, ())
            if family in s.families or ("*" in s.families and family not in SPLIT_FAMILIES)]


def pick(kind: str, engine: Engine, capability: int, family: str = "llama") -> Serving | None:
    """What ``engine`` picks at ``capability`` for ``kind``: the entry with the highest minimum capability
    that the GPU meets, or None when the engine does not load it there."""
    usable = [s for s in serving_for(kind, family) if s.engine == engine
              and (s.min_capability is None or s.min_capability <= capability)]
    return max(usable, key=lambda s: s.min_capability or 0, default=None)


# Architecture families, by the `architectures` entry of config.json (prefix match).
_FAMILIES = {
    "deepseek": ("DeepseekV2", "DeepseekV3", "DeepseekV32", "KimiK2"),
}


def family_of(config: dict | None, split_experts: bool = False) -> str:
    """The architecture family the table's entries are keyed by ("llama" for every other decoder).
    ``split_experts``: the output holds 3-D experts written per expert, keyed by the model type."""
    model_type = (config or {}).get("model_type")
    if split_experts and model_type in SPLIT_FAMILIES:
        return model_type
    for architecture in (config or {}).get("architectures") or []:
        for family, prefixes in _FAMILIES.items():
            if str(architecture).startswith(prefixes):
                return family
    return "llama"


def fused_modules(modules: list[str]) -> dict[str, list[str]]:
    """The fused layers an engine builds from ``modules``: fused module name → its parts present here
    (every part of the engine's fusion, or none, in a well-formed checkpoint)."""
    from qconvert.architectures import ENGINE_FUSIONS

    present = set(modules)
    fused: dict[str, list[str]] = {}
    for module in modules:
        prefix, _, leaf = module.rpartition(".")
        for fused_leaf, parts in ENGINE_FUSIONS.items():
            if leaf == parts[0]:
                members = [f"{prefix}.{part}" if prefix else part for part in parts]
                if any(m in present for m in members[1:]):
                    fused[f"{prefix}.{fused_leaf}" if prefix else fused_leaf] = members
    return fused


def serves_in(kinds: list[str], family: str = "llama", block_misaligned: bool = False) -> list[Serving]:
    """The engines that serve an output made of layers of every kind in ``kinds`` (a mixed-precision
    checkpoint needs each kind served): per engine, one entry per method it picks, each with the lowest
    capability at which it picks it, as the table prints them (fp8-block: vLLM W8A16Fp8 from sm75 and
    W8A8Fp8 from sm89). A mixed checkpoint's entry at a capability joins what each kind picks there.
    ``block_misaligned``: some block-scheme layer is not whole blocks (see :func:`misaligned_layer`)."""
    result = []
    for engine in Engine:
        if block_misaligned and engine in (Engine.VLLM, Engine.SGLANG):
            continue
        capabilities = sorted({s.min_capability or 0 for kind in kinds for s in serving_for(kind, family)
                               if s.engine == engine})
        previous: tuple[str, ...] = ()
        for capability in capabilities:
            picks = [pick(kind, engine, capability or 10**6, family) if capability else
                     next((s for s in serving_for(kind, family) if s.engine == engine and not s.min_capability),
                          None) for kind in kinds]
            if any(p is None for p in picks):
                continue
            methods = tuple(sorted({p.method for p in picks}))  # type: ignore[union-attr]
            if methods == previous:
                continue
            previous = methods
            first = picks[0]
            assert first is not None
            if len(kinds) == 1:
                result.append(first)
            else:
                result.append(Serving(first.engine, first.version, " + ".join(methods), capability or None,
                                      first.families, first.moe_method, first.note))
    return result


def variant_recipe(kind: str) -> str:
    """How to make the output variant ``kind`` (``int8-block@sglang``, ``fp8+fnuz``): the flags, in one phrase."""
    scheme, _, op = kind.partition("+")
    scheme, _, layout = scheme.partition("@")
    if layout:
        return f"qconvert quantize -s {scheme} --layout {layout}"
    if op == "fnuz":
        return f"qconvert quantize -s {scheme} --fnuz, or qconvert convert --op fnuz on a -s {scheme} output"
    if op:
        return f"qconvert convert --op {op} on a -s {scheme} output"
    return f"qconvert quantize -s {scheme}"


def servers_missing(kinds: list[str], family: str = "llama", block_misaligned: bool = False) -> bool:
    """True when no serving engine (vLLM, SGLang) loads such an output."""
    return not any(s.engine in (Engine.VLLM, Engine.SGLANG) for s in serves_in(kinds, family, block_misaligned))


def markdown_table() -> str:
    """The "loads in" table of docs/schemes.md, made from :data:`SERVES` (a test keeps the page equal to it)."""

    def cell(kind: str, family: str) -> str:
        parts = []
        for s in serving_for(kind, family):
            where = f" sm{s.min_capability}+" if s.min_capability else ""
            version = f" {s.version}" if s.version else ""
            parts.append(f"{s.engine.value}{version} `{s.method.removeprefix('CompressedTensors')}`{where}")
        return "; ".join(parts) or "–"

    lines = ["| output | Llama-family (Llama, Qwen, Mistral, Mixtral, ...) | DeepSeek-family (V2/V3) "
             "| gpt-oss (experts per expert) | GraniteMoE (experts per expert) |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| `{kind}` | {' | '.join(cell(kind, family) for family in FAMILIES)} |" for kind in SERVES]
    return "\n".join(lines) + "\n"


def schemes_table() -> str:
    """The README's short schemes table: each scheme, its weights and activations, the format it writes and the
    engines that load it for Llama-family models from the lowest capability (docs/schemes.md has the rest)."""
    from qconvert.scheme_catalog import CATALOG

    names = {"vllm": "vLLM", "sglang": "SGLang", "transformers": "transformers"}
    lines = ["| scheme | weights | activations (dynamic) | written as | loads in (Llama-family) |",
             "| --- | --- | --- | --- | --- |"]
    for row in CATALOG:
        lowest: dict[str, int | None] = {}
        for s in serving_for(row["name"]):
            if s.engine.value in names and s.engine.value not in lowest:
                lowest[s.engine.value] = s.min_capability
        loads = ", ".join(f"{names[e]}{f' sm{c}+' if c else ''}" for e, c in lowest.items()) or "qconvert verify"
        act = row["input_activations"]
        number = {"float": "fp"}.get(act["type"], act["type"]) if act else ""
        activations = "–" if not act else (f"{number}{act['num_bits']} per token"
                                           + (f" per {act['group_size']} channels" if act.get("group_size") else ""))
        lines.append(f"| `{row['name']}` | {row['label']} | {activations} | `{row['format']}` | {loads} |")
    return "\n".join(lines) + "\n"


README_MARKERS = ("<!-- serving-table -->\n", "<!-- /serving-table -->")
SCHEMES_MARKERS = ("<!-- schemes-table -->\n", "<!-- /schemes-table -->")


def readme_with_table(readme: str) -> str:
    """``readme`` with the text between each pair of markers it holds replaced by its table: :data:`README_MARKERS`
    by :func:`markdown_table` (docs/schemes.md), :data:`SCHEMES_MARKERS` by :func:`schemes_table` (README.md)."""
    for (start, end), make in ((README_MARKERS, markdown_table), (SCHEMES_MARKERS, schemes_table)):
        if start in readme:
            head, _, rest = readme.partition(start)
            _, _, tail = rest.partition(end)
            readme = f"{head}{start}{make()}{end}{tail}"
    return readme


if __name__ == "__main__":  # python -m qconvert.serving [PAGE.md ...]: print the table, or write the tables in pages
    import sys
    from pathlib import Path

    for path in map(Path, sys.argv[1:]):
        path.write_text(readme_with_table(path.read_text()))
    if len(sys.argv) == 1:
        print(markdown_table(), end="")


# Block methods of vLLM and SGLang need every quantized layer's output and input size (and every part of a fused
# layer) to be whole blocks; a partial block, which qconvert itself writes correctly, is refused at load
# ("output_partition_size = 64 is not divisible by weight quantization block_n = 128").
BLOCK_ALIGNED_KINDS = {"fp8-block": 128}


def misaligned_layer(kind: str, layers: list[tuple[str, tuple[int, ...]]]) -> tuple[str, tuple[int, ...]] | None:
    """The first (module, shape) of ``kind`` that vLLM and SGLang would refuse for partial blocks, or None."""
    block = BLOCK_ALIGNED_KINDS.get(kind.split("+")[0])
    if block is None:
        return None
    return next(((m, s) for m, s in layers if s[0] % block or s[1] % block), None)
