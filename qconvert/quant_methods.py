"""Which stored quantization methods qconvert reads, and a one-line refusal for every other one.

A checkpoint says how it is quantized in config.json's ``quantization_config.quant_method`` (every method
transformers knows: its ``QuantizationMethod`` enum), or in ModelOpt's ``hf_quant_config.json`` beside it. A
method we cannot read must never pass through as if the checkpoint were full precision: its packed tensors
(``*_blocks`` of MXFP4, GPTQ's ``qweight``, bitsandbytes' ``weight.absmax``) would be copied untouched under a
compressed-tensors config that does not describe them. So opening a checkpoint refuses it, naming the method.

:data:`READERS` is the methods we read, each with a check of the variants we do not; :data:`NOT_READABLE`
names every other known method. A new reader claims its method by moving it from the second to the first (as
gpt-oss's MXFP4 and ModelOpt's NVFP4 / FP8 were).
When the config says nothing, the tensor names still betray the common packed layouts (:data:`SIGNATURES`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qconvert.errors import BadInputError

MODELOPT_CONFIG = "hf_quant_config.json"

# compressed-tensors ``format`` values we read (the writers' own names, see qconvert.formats), plus the two
# that only say "see each group" or "not compressed".
_CT_FORMATS = {"dense", "mixed-precision", "pack-quantized", "int-quantized", "float-quantized",
               "nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp8-quantized"}


def _compressed_tensors_problem(qconfig: dict) -> str | None:
    formats = [("format", qconfig.get("format"))]
    groups = qconfig.get("config_groups")
    if isinstance(groups, dict):
        formats += [(f"config_groups.{name}.format", group.get("format"))
                    for name, group in groups.items() if isinstance(group, dict)]
    for where, value in formats:
        if value is not None and value not in _CT_FORMATS:
            return f"compressed-tensors {where} {value!r:.60}"
    sparsity = qconfig.get("sparsity_config")
    if isinstance(sparsity, dict) and sparsity.get("format") not in (None, "dense"):
        return f"compressed-tensors sparsity_config.format {sparsity.get('format')!r:.60} (sparse weights)"
    return None


def _fp8_problem(qconfig: dict) -> str | None:
    # transformers' FineGrainedFP8Config: DeepSeek-V3 is fp32 scales and fp8 experts; V4 differs in both.
    if qconfig.get("scale_fmt", "float") != "float":
        return f"fp8 with scale_fmt {qconfig.get('scale_fmt')!r:.40} (DeepSeek-V4-style E8M0 block scales)"
    if qconfig.get("expert_dtype", "fp8") != "fp8":
        return f"fp8 with expert_dtype {qconfig.get('expert_dtype')!r:.40} (DeepSeek-V4-style FP4 experts)"
    return None


# quant_method -> what of its variants we cannot read (None: all of it is read by qconvert.formats).
READERS: dict[str, Callable[[dict], str | None]] = {
    "compressed-tensors": _compressed_tensors_problem,
    "compressed_tensors": _compressed_tensors_problem,  # vLLM's spelling, accepted by it
    "fp8": _fp8_problem,  # DeepSeek-V3-style block FP8 (weight_scale_inv)
    "blockwise_int8": lambda _: None,  # SGLang's, as --layout sglang writes it
    "mxfp4": lambda _: None,  # gpt-oss's experts (*_blocks / *_scales): qconvert.formats.gpt_oss
    "modelopt": lambda _: None,  # NVFP4 and FP8 (qconvert.formats.microscaled, tiled); other quant_algo: below
}
MODELOPT_ALGOS = ("NVFP4", "FP8")  # the ModelOpt quant_algo values qconvert reads

# Every other method transformers knows (utils/quantization_config.py QuantizationMethod), and ModelOpt's:
# how it stores weights, for the refusal.
NOT_READABLE: dict[str, str] = {
    "bitsandbytes": "bitsandbytes: uint8-packed 4-bit or int8 weights with absmax/quant_state",
    "gptq": "GPTQ: int32-packed qweight/qzeros, scales, g_idx",
    "awq": "AWQ: int32-packed qweight/qzeros, scales",
    "aqlm": "AQLM: additive codebooks",
    "vptq": "VPTQ: vector codebooks",
    "quanto": "optimum-quanto",
    "eetq": "EETQ: int8 weights",
    "higgs": "HIGGS: Hadamard-rotated codebooks",
    "hqq": "HQQ: packed W_q with scale/zero",
    "fbgemm_fp8": "FBGEMM FP8: per-channel fp8 with input_scale_ub",
    "torchao": "torchao: tensor subclasses",
    "gguf": "GGUF",
    "bitnet": "BitNet: packed ternary weights",
    "spqr": "SpQR: sparse outliers and 3-bit codes",
    "quark": "AMD Quark",
    "fp_quant": "FP-Quant: Hadamard-rotated MXFP4/NVFP4",
    "auto-round": "AutoRound: packed qweight",
    "nvfp4": "transformers NVFP4",
    "mxfp8": "transformers MXFP8: fp8 with E8M0 block scales",
    "metal": "Metal: packed low-bit",
    "fouroversix": "Four Over Six: FP4",
    "sinq": "SINQ",
    "gemma": "Gemma pre-quantized: packed low-bit",
}
_ALIASES = {"bitsandbytes_4bit": "bitsandbytes", "bitsandbytes_8bit": "bitsandbytes", "autoround": "auto-round",
            "auto_round": "auto-round", "modelopt_fp4": "modelopt"}


@dataclass(frozen=True)
class StoredMethod:
    """How a checkpoint says it is quantized: the method and where it says so."""

    method: str
    source: Path  # config.json or hf_quant_config.json
    detail: str = ""  # e.g. ModelOpt's quant_algo, bitsandbytes' 4-bit/8-bit

    @property
    def name(self) -> str:
        return f"{self.method} {self.detail}".strip()


def stored_method(root: Path, config: dict | None) -> StoredMethod | None:
    """The quantization method ``root``'s files state (None: unquantized as far as they say)."""
    modelopt = root / MODELOPT_CONFIG
    if os.path.lexists(modelopt):
        return _modelopt(modelopt)
    if not config:
        return None
    found = [(config.get("quantization_config"), "quantization_config")]
    # A multimodal model may state its language model's quantization in its sub-config only.
    found += [(sub.get("quantization_config"), f"{key}.quantization_config") for key, sub in config.items()
              if key.endswith("_config") and isinstance(sub, dict)]
    for qconfig, where in found:
        if qconfig is not None:
            return _method_of(root / "config.json", where, qconfig)
    return None


def _modelopt(path: Path) -> StoredMethod:
    from qconvert.checkpoint import read_json  # the same safe reader as config.json

    data = read_json(path)
    quantization = data.get("quantization") if isinstance(data, dict) else None
    algo = quantization.get("quant_algo") if isinstance(quantization, dict) else None
    return StoredMethod("modelopt", path, f"quant_algo {algo}" if isinstance(algo, str) else "")


def _method_of(path: Path, where: str, qconfig: object) -> StoredMethod:
    if not isinstance(qconfig, dict):
        raise BadInputError(f"{path}: {where} must be a JSON object, not {type(qconfig).__name__}")
    method = qconfig.get("quant_method")
    if qconfig.get("load_in_4bit") is True or qconfig.get("load_in_8bit") is True:
        # transformers' own test: older bitsandbytes configs carry these flags and no quant_method.
        quant_type = qconfig.get("bnb_4bit_quant_type")
        bits = "8-bit" if qconfig.get("load_in_4bit") is not True else \
            f"4-bit {quant_type}" if isinstance(quant_type, str) else "4-bit"
        return StoredMethod("bitsandbytes", path, bits)
    if method is None:
        raise BadInputError(f"{path}: {where} names no quant_method, so how its weights are stored is unknown")
    if not isinstance(method, str):
        raise BadInputError(f"{path}: {where}.quant_method {method!r:.40} is not a string")
    method = _ALIASES.get(method.lower(), method.lower())
    algo = qconfig.get("quant_algo")
    if method == "modelopt" and isinstance(algo, str):
        return StoredMethod(method, path, f"quant_algo {algo}")
    return StoredMethod(method, path)


def unreadable(method: StoredMethod | None, config: dict | None) -> str | None:
    """Why qconvert cannot read a checkpoint stored with ``method`` (None: it can)."""
    if method is None:
        return None
    if method.method == "modelopt":
        algo = method.detail.removeprefix("quant_algo ")
        return None if algo in MODELOPT_ALGOS else \
            f"{method.name[:60]} (NVIDIA ModelOpt; qconvert reads quant_algo {' and '.join(MODELOPT_ALGOS)})"
    check = READERS.get(method.method)
    if check is not None:
        qconfig = (config or {}).get("quantization_config")
        return check(qconfig) if isinstance(qconfig, dict) else None
    what = NOT_READABLE.get(method.method, "a method qconvert does not know")
    return f"{method.name[:60]} ({what})"


def refusal(method: StoredMethod, why: str) -> str:
    where = "quantization_config" if method.source.name == "config.json" else "it"
    return (f"{method.source}: {where} states {why}, which qconvert does not read yet; start from the "
            "unquantized (bf16/fp16) release of this model")


def refuse_unreadable(root: Path, config: dict | None) -> StoredMethod | None:
    """The checkpoint's stated method, if qconvert reads it; else one line naming it (BadInputError)."""
    method = stored_method(root, config)
    why = unreadable(method, config)
    if why is not None:
        raise BadInputError(refusal(method, why))  # type: ignore[arg-type]
    return method


# ---------------------------------------------------------------- what the tensor names say

@dataclass(frozen=True)
class Signature:
    layout: str  # for the refusal: "is in {layout}"
    matches: Callable[[str, str, set[str]], bool]  # (module, leaf, leaves of that module)
    ours: bool = False  # written by qconvert (verify and inspect know it; quantize and convert cannot read it)


SIGNATURES = [
    Signature("the gptq/awq/auto-round layout (qweight)", lambda _m, leaf, leaves: leaf == "qweight"),
    Signature("the bitsandbytes layout (absmax, quant_state)",
              lambda m, leaf, _l: (m.endswith(".weight") and leaf in ("absmax", "quant_map"))
              or ".weight.quant_state." in f"{m}.{leaf}" or leaf == "SCB"),
    # (gpt-oss's own experts, `experts.gate_up_proj_blocks` / `experts.down_proj_blocks`, are read: formats.gpt_oss)
    Signature("an mxfp4 layout (*_blocks with *_scales) other than gpt-oss's experts",
              lambda m, leaf, leaves: leaf.endswith("_blocks") and f"{leaf.removesuffix('_blocks')}_scales" in leaves
              and not (m.endswith(".experts") and leaf in ("gate_up_proj_blocks", "down_proj_blocks"))),
    Signature("the hqq layout (W_q)", lambda _m, leaf, leaves: leaf == "W_q"),
    # gpt-oss experts as qconvert writes them for vLLM (experts.3.w13_weight_packed): without weight_shape and
    # outside the config's targets, so they cannot be read back; copied as they are, they would keep their old
    # scheme under the new config and drop out of the coverage.
    Signature("vLLM's per-expert layout, which qconvert writes for gpt-oss but cannot read back",
              lambda _m, leaf, _l: leaf.endswith("_weight_packed") and leaf != "weight_packed", ours=True),
]


def packed_tensor(names: list[str], ours_ok: bool = False) -> tuple[str, str] | None:
    """``(layout, tensor)`` for the first tensor stored in a packed layout we do not read, by its name
    (``ours_ok``: except the ones qconvert writes, for commands that only look at them)."""
    leaves: dict[str, set[str]] = {}
    for name in names:
        module, _, leaf = name.rpartition(".")
        leaves.setdefault(module, set()).add(leaf)
    for name in names:
        module, _, leaf = name.rpartition(".")
        for signature in SIGNATURES:
            if not (ours_ok and signature.ours) and signature.matches(module, leaf, leaves[module]):
                return signature.layout, name
    return None


def describe(method: StoredMethod | None, config: dict | None, names: list[str]) -> str | None:
    """``inspect``'s account of a checkpoint qconvert cannot read (None: it can)."""
    why = unreadable(method, config)
    if why is not None:
        return f"{why}; not readable by qconvert"
    if method is None and (found := packed_tensor(names, ours_ok=True)) is not None:
        return f"tensor {found[1]} is in {found[0]}, and no quantization_config; not readable by qconvert"
    return None

