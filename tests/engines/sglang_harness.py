"""Drive SGLang's real loading code on a checkpoint folder written by qconvert (CPU only, no GPU).

What runs is SGLang's own code, in the order its ``DefaultModelLoader.load_model`` runs it:
``ServerArgs`` + ``publish`` (the process entry), ``init_distributed_environment`` /
``initialize_model_parallel`` (gloo, world size 1), ``ModelConfig.from_server_args`` (reads config.json and
checks the quantization method), ``_get_quantization_config`` (builds the quant config with the model class's
``packed_modules_mapping`` and checks the GPU capability), ``_initialize_model`` (the real model class, whose
layers ask the quant config for a method/scheme per layer and create their parameters), the loader's own
safetensors iterator and the model's own ``load_weights`` (stacked q/k/v -> qkv_proj, renames, MoE experts).

Patched, and why (nothing else is):
- the GPU capability query (``torch.cuda.get_device_capability`` and SGLang's ``get_device_capability``
  wherever imported): there is no GPU; the test sets sm75/80/89/90 and SGLang picks schemes from it.
- ``sglang.srt.layers.rotary_embedding.base._is_cpu``: kernel selection only. Off CUDA and off SGLang's CPU
  engine, RotaryEmbedding imports its fallback rope kernel from vLLM's ``_custom_ops``; True makes it use its
  native torch implementation. Rope has no parameters and plays no part in quantization or loading.
- the operator schemas ``torchvision::nms`` / ``torchvision::qnms`` are declared before the first import:
  torchvision exists on PyPI only as CUDA builds, its C extension cannot load on CPU torch, and its pure-Python
  import registers fake kernels for those two operators (``sglang.srt.configs`` imports torchvision for
  multimodal image transforms, which nothing here uses).
sgl-kernel (``sglang-kernel``) is not installed and not stubbed: nothing imported here needs it.

Added check (not one SGLang runs while loading): its ``CompressedTensorsWNA16`` layers compute with Marlin on
CUDA, so each layer's weight type (with or without zero points) must be one SGLang's own
``query_marlin_supported_quant_types`` lists at the capability (``check_marlin_types``; int8 with zero points is
not: SGLang loads int8-asym, and its Marlin cannot run it).

Loaded parameters are compared with the tensors on disk as the loader wrote them. Then, given qconvert's own
dequantization of the checkpoint (``convert --op dequantize``, in the model's dtype), SGLang's
``process_weights_after_loading`` runs per layer where it runs on a CPU (fp8 and block-int8 methods, dense and
MoE; not Marlin repacking, which needs CUDA: reported as such) and the weights as SGLang will compute with them,
dequantized (code x scale), must equal qconvert's dequantization exactly. NVFP4 layers (weight-only linear and
MoE schemes) are processed by ``check_microscaled`` instead, whatever the reference: up to the FP4 Marlin
repacking (the helper is replaced by a stop), so that SGLang's own checks run (fused projections and each
expert's gate/up must share one global scale) and what it hands the kernel is compared with the checkpoint
decoded on its own (``microscaled.py``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ENGINE = "sglang"
VERSION = "0.5.23"

# Checkpoint module name -> (fused module SGLang builds, shard index) for the architectures tested.
FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    "q_a_proj": ("fused_qkv_a_proj_with_mqa", 0), "kv_a_proj_with_mqa": ("fused_qkv_a_proj_with_mqa", 1),
}
# Layer kind reported for each SGLang module (the last name component; experts are the FusedMoE module).
LAYER_KINDS = {
    "qkv_proj": "qkv", "o_proj": "o", "gate_up_proj": "gate_up", "down_proj": "down", "experts": "experts",
    "fused_qkv_a_proj_with_mqa": "mla_qkv_a", "q_b_proj": "mla_q_b", "kv_b_proj": "mla_kv_b",
    "q_proj": "mla_q", "lm_head": "lm_head",
}


@dataclass
class Result:
    engine: str
    version: str
    family: str  # "llama" | "deepseek"
    kind: str  # output kind, as qconvert.serving.output_kind names it
    capability: int
    picks: dict[str, str] = field(default_factory=dict)  # layer kind -> class SGLang picked
    loaded: bool = False
    problems: list[str] = field(default_factory=list)
    # After SGLang's own process_weights_after_loading, where it runs on a CPU: the weights SGLang would
    # compute with, dequantized, against qconvert's dequantization ("" when not attempted).
    postload: str = ""
    case: str = ""  # which test case (several cases can share an output kind)

    def to_json(self) -> dict:
        return asdict(self)


_IMPORTED: dict = {}


def _declare_torchvision_ops() -> None:
    """Declare the two operator schemas torchvision's pure-Python import needs, only where torchvision is
    installed and its C extension cannot load (the CUDA build on a CPU torch)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    extension = next(Path(spec.submodule_search_locations[0]).glob("_C*.so"), None)
    try:
        if extension is not None:
            torch.ops.load_library(str(extension))
            return
    except OSError:
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _IMPORTED["torchvision_lib"] = lib  # the schemas live as long as the library object


def import_sglang() -> str:
    """Import what the harness drives; raises ImportError when SGLang is not importable here."""
    if "version" in _IMPORTED:
        return _IMPORTED["version"]
    if importlib.util.find_spec("sglang") is None:
        raise ImportError("sglang is not installed in this environment")
    _declare_torchvision_ops()
    import sglang
    import sglang.srt.layers.rotary_embedding.base as rope_base
    import sglang.srt.model_loader.loader
    import sglang.srt.models.deepseek_v2
    import sglang.srt.models.llama

    if sglang.__version__ != VERSION:
        raise ImportError(f"SGLang {sglang.__version__} is installed; the tier is pinned to {VERSION}")
    rope_base._is_cpu = True  # see the module docstring: kernel selection for rope only
    _IMPORTED["version"] = sglang.__version__
    return sglang.__version__


@contextmanager
def gpu_capability(capability: int) -> Iterator[None]:
    """Make every capability query SGLang makes answer ``capability`` (e.g. 89 -> (8, 9))."""
    import sys

    from sglang.srt.utils import common

    answer = (capability // 10, capability % 10)
    original = common.get_device_capability

    def fake(device_id: int = 0) -> tuple[int, int]:
        return answer

    patched = [(torch.cuda, "get_device_capability", torch.cuda.get_device_capability)]
    torch.cuda.get_device_capability = fake
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("sglang") and \
                getattr(module, "get_device_capability", None) is original:
            patched.append((module, "get_device_capability", original))
            module.get_device_capability = fake
    try:
        yield
    finally:
        for owner, name, value in reversed(patched):
            setattr(owner, name, value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _runtime(checkpoint: Path):
    """Publish server args for ``checkpoint`` and build the (world size 1) parallel groups once."""
    from sglang.srt.distributed import parallel_state
    from sglang.srt.runtime_context import SpawnRanks, publish
    from sglang.srt.server_args import ServerArgs

    server_args = ServerArgs(model_path=str(checkpoint), device="cpu", tp_size=1, skip_tokenizer_init=True)
    publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=0))
    if not _IMPORTED.get("distributed"):
        parallel_state.init_distributed_environment(
            world_size=1, rank=0, local_rank=0, backend="gloo",
            distributed_init_method=f"tcp://127.0.0.1:{_free_port()}")
        parallel_state.initialize_model_parallel()
        _IMPORTED["distributed"] = True
    return server_args


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage().splitlines()[0])


def _one_line(exc: BaseException) -> str:
    if os.environ.get("QCONVERT_ENGINES_DEBUG") == "1":
        import traceback

        traceback.print_exception(exc)
    # SGLang raises some errors with several string arguments (a message split in parts): join them.
    text = "".join(str(part) for part in exc.args).strip() if exc.args else ""
    return f"{type(exc).__name__}: {text or repr(exc)}".splitlines()[0]


def _pick_name(module: torch.nn.Module) -> str | None:
    method = getattr(module, "quant_method", None)
    if method is None:
        return None
    scheme = getattr(module, "scheme", None)
    return type(scheme).__name__ if scheme is not None else type(method).__name__


def picks_of(model: torch.nn.Module) -> dict[str, str]:
    """Layer kind -> class SGLang picked (several classes for one kind, e.g. in mixed configs: joined by '|')."""
    found: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        kind = LAYER_KINDS.get(leaf)
        if kind is None or (pick := _pick_name(module)) is None:
            continue
        if ".shared_experts." in name:
            kind = f"shared_{kind}"
        found.setdefault(kind, set()).add(pick)
    return {kind: "|".join(sorted(names)) for kind, names in sorted(found.items())}


def check_marlin_types(model: torch.nn.Module, capability: int) -> list[str]:
    """SGLang's CompressedTensorsWNA16 computes with Marlin on CUDA whatever the weight type, and does not ask
    whether Marlin takes it: ask SGLang's own ``marlin_utils.query_marlin_supported_quant_types`` for each layer's
    (weight type, zero points) at ``capability`` (zero points: uint4 only), one problem per unsupported type."""
    from sglang.srt.layers.quantization.marlin_utils import query_marlin_supported_quant_types

    problems: dict[str, str] = {}
    for name, module in model.named_modules():
        config = getattr(getattr(module, "scheme", None), "kernel_config", None)
        if config is None or not hasattr(config, "zero_points"):
            continue
        supported = query_marlin_supported_quant_types(config.zero_points, device_capability=capability)
        if config.weight_type not in supported:
            zero = "with" if config.zero_points else "without"
            weight = str(config.weight_type).removeprefix("mock_")  # (SGLang's CPU stand-in for its scalar types)
            problems.setdefault(str(config.weight_type), (
                f"{name}: {type(module.scheme).__name__} runs Marlin, which takes no {weight} {zero} "
                f"zero points at sm{capability} (SGLang's query_marlin_supported_quant_types: "
                f"{[str(t).removeprefix('mock_') for t in supported]})"))
    return list(problems.values())


# ---------------------------------------------------------------------------------------------------------
# What each SGLang parameter must hold, computed from the files on disk (our own mapping, not SGLang's).
# ---------------------------------------------------------------------------------------------------------

def _disk_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _sources(param_name: str, disk: dict[str, torch.Tensor]) -> tuple[list[list[str]], str]:
    """The disk tensors a parameter is made of: a list (per expert, or one) of lists (per shard), and how."""
    module, _, suffix = param_name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    if leaf == "experts" and suffix.startswith(("w13_", "w2_")):
        head, _, rest = suffix.partition("_")
        experts = sorted({int(k[len(module) + 1:].split(".")[0]) for k in disk if k.startswith(module + ".")})
        parts = ["gate_proj", "up_proj"] if head == "w13" else ["down_proj"]
        return [[f"{module}.{e}.{p}.{rest}" for p in parts] for e in experts], "experts"
    shards = sorted((shard, name) for name, (fused, shard) in FUSED.items() if fused == leaf)
    if shards:
        return [[f"{parent}.{name}.{suffix}" for _, name in shards]], "fused"
    return [[param_name]], "plain"


FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2)


def _same(loaded: torch.Tensor, expected: torch.Tensor) -> bool:
    """Exactly the values on disk. A wider float parameter holding a narrower disk dtype is fine (scales
    stored bf16, held fp32: exact); an fp8 parameter of another fp8 type than the file's is not: copy_
    converts by value (e4m3fnuz -> e4m3fn rounds 16 of 256 codes) and the engine reads the codes as its type."""
    if loaded.shape != expected.shape:
        return False
    if loaded.dtype in FP8 or expected.dtype in FP8:
        return loaded.dtype == expected.dtype and torch.equal(loaded.view(torch.uint8), expected.view(torch.uint8))
    if loaded.is_floating_point():
        expected = expected.to(loaded.dtype)
        return bool(torch.equal(loaded, expected)) and not bool(torch.isnan(loaded).any())
    return torch.equal(loaded, expected.to(loaded.dtype))


def _why(loaded: torch.Tensor, expected: torch.Tensor | None) -> str:
    if expected is not None and loaded.dtype != expected.dtype and (loaded.dtype in FP8 or expected.dtype in FP8):
        changed = f", {int((loaded.float() != expected.float()).sum())} of {loaded.numel()} values changed" \
            if loaded.shape == expected.shape else ""
        return (f"the file holds {str(expected.dtype).removeprefix('torch.')}, SGLang's parameter is "
                f"{str(loaded.dtype).removeprefix('torch.')} (values converted by copy_{changed})")
    return "differs from the tensors on disk"


def _expected_shard_stack(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor | None:
    """Shards stacked as a fused parameter holds them: concatenated on the output dim, one scalar per shard,
    or (per-tensor scale, weight_shape) the parameter holds one shard's value."""
    if all(p.dim() >= 1 for p in parts):
        cat = torch.cat(parts, 0)
        if cat.shape == like.shape:
            return cat
        if cat.dim() >= 2 and cat.transpose(-1, -2).shape == like.shape:
            return cat.transpose(-1, -2)
    flat = torch.stack([p.reshape(-1) for p in parts])
    if flat.numel() == like.numel():
        return flat.reshape(like.shape)
    return None


def check_loaded(model: torch.nn.Module, disk: dict[str, torch.Tensor], sentinel: dict[str, torch.Tensor]
                 ) -> list[str]:
    """One line per parameter that does not hold exactly what is on disk, and per disk tensor that no
    parameter holds (dropped by the loader or unknown to the method SGLang picked)."""
    problems: list[str] = []
    used: set[str] = set()
    for name, param in model.named_parameters():
        data = param.detach()
        groups, how = _sources(name, disk)
        missing = [n for group in groups for n in group if n not in disk]
        if missing:
            if name.endswith("lm_head.weight") and "model.embed_tokens.weight" in disk and not missing[1:]:
                continue
            if _is_sentinel(data, sentinel.get(name)):
                problems.append(f"{name}: never loaded (no tensor {missing[0]} on disk)")
            continue
        used.update(n for group in groups for n in group)
        reference = disk[groups[0][0]]
        if how == "experts":
            expected = [_expected_shard_stack([disk[n] for n in group], data[0]) for group in groups]
            ok = len(expected) == data.shape[0] and all(
                e is not None and _same(data[i], e) for i, e in enumerate(expected))
            if len(expected) == data.shape[0] and all(e is not None for e in expected):
                reference = torch.stack(expected)
        elif how == "fused":
            parts = [disk[n] for n in groups[0]]
            stacked = _expected_shard_stack(parts, data)
            ok = stacked is not None and _same(data, stacked)
            if not ok and all(p.shape == data.shape for p in parts):
                ok = any(_same(data, p) for p in parts)  # e.g. weight_shape: one value for every shard
            reference = stacked if stacked is not None else reference
        else:
            ok = _same(data, reference)
        if not ok:
            state = "never loaded (still at its initial fill)" if _is_sentinel(data, sentinel.get(name)) \
                else _why(data, reference)
            problems.append(f"{name} {tuple(data.shape)} {str(data.dtype).removeprefix('torch.')}: {state}")
    for name in sorted(set(disk) - used):
        problems.append(f"{name}: on disk but no SGLang parameter holds it (dropped at load)")
    return problems


def _fill_sentinels(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Fill every parameter with a value no loader writes (NaN, or a bit pattern), so that a parameter the
    loader never wrote is told apart from one it wrote."""
    fills = {}
    for name, param in model.named_parameters():
        data = param.data
        if data.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2):
            data.view(torch.uint8).fill_(0x7F)
        elif data.is_floating_point():
            data.fill_(float("nan"))
        elif data.dtype == torch.bool:
            continue
        else:
            data.fill_(-77 if data.dtype == torch.int8 else 0x5A5A5A5 if data.dtype in (torch.int32, torch.int64)
                       else 77)
        fills[name] = data.clone()
    return fills


def _is_sentinel(data: torch.Tensor, fill: torch.Tensor | None) -> bool:
    if fill is None:
        return False
    if data.is_floating_point() and data.dtype not in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        return bool(torch.isnan(data).any())
    return bool((data.reshape(-1).view(torch.uint8) == fill.reshape(-1).view(torch.uint8)).all()) if \
        data.element_size() == 1 else bool(torch.equal(data, fill))


# ---------------------------------------------------------------------------------------------------------
# After SGLang's post-load processing: its weights dequantized against qconvert's dequantization.
# ---------------------------------------------------------------------------------------------------------

def _dequantize(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """codes [out, in] x scale broadcast: per tensor (one value), per channel [out, 1], or per block."""
    codes = codes.float()
    scale = scale.float()
    if scale.numel() == 1:
        return codes * scale.reshape(())
    if scale.dim() == 2 and scale.shape[1] == 1 and scale.shape[0] == codes.shape[0]:
        return codes * scale
    rows, cols = block
    full = scale.repeat_interleave(rows, 0)[: codes.shape[0]].repeat_interleave(cols, 1)[:, : codes.shape[1]]
    return codes * full


def _engine_weight(module: torch.nn.Module, prefix: str) -> torch.Tensor | None:
    weight = getattr(module, f"{prefix}weight", None)
    scale = getattr(module, f"{prefix}weight_scale", None)
    if scale is None:
        scale = getattr(module, f"{prefix}weight_scale_inv", None)
    if weight is None or scale is None or weight.dtype not in (torch.int8, *FP8):
        return None
    return weight.detach(), scale.detach()


def _reference(name: str, reference: dict[str, torch.Tensor]) -> torch.Tensor | None:
    groups, how = _sources(f"{name}.weight", reference)
    if how != "experts":
        parts = [reference.get(n) for n in groups[0]]
        return None if any(p is None for p in parts) else torch.cat(parts, 0)
    return None


def _block_of(checkpoint: Path) -> tuple[int, int]:
    """The block size the checkpoint's config declares (SGLang reads the same field); 128x128 otherwise."""
    config = json.loads((checkpoint / "config.json").read_text()).get("quantization_config") or {}
    if config.get("weight_block_size"):
        return tuple(config["weight_block_size"])
    for group in (config.get("config_groups") or {}).values():
        if (group.get("weights") or {}).get("block_structure"):
            return tuple(group["weights"]["block_structure"])
    return (128, 128)


def check_postload(model: torch.nn.Module, reference: dict[str, torch.Tensor], block: tuple[int, int]
                   ) -> tuple[str, list[str]]:
    """Run each quantized layer's post-load processing; compare what runs. (summary, problems)"""
    from sglang.srt.model_loader.loader import _modules_with_quant_method

    names = {id(m): n for n, m in model.named_modules()}
    compared, skipped, problems, elsewhere = 0, {}, [], 0
    for module, method in _modules_with_quant_method(model):
        name = names.get(id(module), "?")
        kind = type(getattr(module, "scheme", None) or method).__name__
        if kind in MICROSCALED:  # (check_microscaled has processed and compared those)
            elsewhere += 1
            continue
        if kind.startswith("Unquantized"):
            continue
        try:
            method.process_weights_after_loading(module)
        except Exception as exc:  # a GPU kernel (repacking): nothing to compare on a CPU
            skipped.setdefault(kind, _one_line(exc))
            continue
        for prefix, expected in _expected_after(module, name, reference):
            got = _engine_weight(module, prefix)
            if got is None or expected is None:
                skipped.setdefault(kind, "weights not in (codes, scale) form after processing")
                continue
            codes, scale = got
            if not codes.is_contiguous() and codes.transpose(-1, -2).is_contiguous():
                codes = codes.transpose(-1, -2)  # kept as a transposed view ([in, out]) for the GEMM
            if codes.dim() == 3:
                got_full = torch.stack([_dequantize(codes[e], scale[e], block) for e in range(codes.shape[0])])
            else:
                got_full = _dequantize(codes, scale, block)
            # qconvert dequantizes in the model's dtype: code x scale is exact in float32 (an fp8/int8 code
            # times a bf16 scale), so rounding that product once to the model's dtype must give its values.
            got_full = got_full.to(expected.dtype)
            compared += 1
            if got_full.shape != expected.shape or not torch.equal(got_full, expected):
                bad = int((got_full != expected).sum()) if got_full.shape == expected.shape else -1
                problems.append(f"{name}{'.' + prefix.rstrip('_') if prefix else ''}: after SGLang's "
                                f"{kind}.process_weights_after_loading, dequantized weights differ from qconvert's "
                                f"({bad} of {expected.numel()} values)")
    if elsewhere and not compared and not skipped:
        return "", problems
    summary = f"{compared} layers compared after post-load processing"
    if skipped:
        summary += "; not run on a CPU: " + "; ".join(f"{k} ({v})" for k, v in sorted(skipped.items()))
    return summary, problems


def _expected_after(module: torch.nn.Module, name: str, reference: dict[str, torch.Tensor]):
    if hasattr(module, "w13_weight") or hasattr(module, "w2_weight"):
        experts = sorted({int(k[len(name) + 1:].split(".")[0]) for k in reference if k.startswith(name + ".")})
        for prefix, parts in (("w13_", ("gate_proj", "up_proj")), ("w2_", ("down_proj",))):
            tensors = [[reference.get(f"{name}.{e}.{p}.weight") for p in parts] for e in experts]
            ok = experts and all(t is not None for group in tensors for t in group)
            yield prefix, torch.stack([torch.cat(group, 0) for group in tensors]) if ok else None
    else:
        yield "", _reference(name, reference)


# ---------------------------------------------------------------------------------------------------------
# Microscaled (NVFP4) layers after SGLang's post-load processing, against the checkpoint decoded on its own.
# ---------------------------------------------------------------------------------------------------------

# SGLang's NVFP4 linear scheme and MoE scheme -> the helper (module, name) its processing ends with: the GPU
# repacking for FP4 Marlin, which needs CUDA. Everything before it (renames, the global-scale checks and
# inversion) is SGLang's and runs here. SGLang 0.5.23 has no compressed-tensors MXFP4 / MXFP8 linear scheme.
MICROSCALED = {
    "CompressedTensorsW4A16Fp4": (
        "sglang.srt.layers.quantization.compressed_tensors.schemes.compressed_tensors_w4a16_nvfp4",
        "prepare_nvfp4_layer_for_marlin"),
    "CompressedTensorsW4A16Nvfp4MoE": ("sglang.srt.layers.quantization.marlin_utils_fp4",
                                       "prepare_moe_nvfp4_layer_for_marlin"),
}


class _Repacking(Exception):
    """Raised by the stand-in of the GPU repacking helper: SGLang's own processing reached it."""


def _process_until_repacking(module: torch.nn.Module, method, kind: str) -> str | None:
    """Run the layer's process_weights_after_loading until the repacking; None when it got there, else SGLang's
    refusal (its own checks run first: fused NVFP4 projections must share one global scale)."""
    import importlib

    owner_name, helper = MICROSCALED[kind]
    owner = importlib.import_module(owner_name)
    real = getattr(owner, helper)

    def stop(*args, **kwargs):
        raise _Repacking

    setattr(owner, helper, stop)
    try:
        method.process_weights_after_loading(module)
    except _Repacking:
        return None
    except Exception as exc:
        return _one_line(exc)
    finally:
        setattr(owner, helper, real)
    return "the repacking was not reached"


def check_microscaled(model: torch.nn.Module, disk: dict[str, torch.Tensor]) -> tuple[str, list[str]]:
    """For NVFP4 layers: SGLang's process_weights_after_loading up to the FP4 Marlin repacking, then the weights
    it hands the kernel (codes x e4m3 scale x its one global scale per layer / per expert) against each
    checkpoint part decoded on its own (``microscaled.decode``). (summary, problems)"""
    from sglang.srt.model_loader.loader import _modules_with_quant_method

    from tests.engines import microscaled

    names = {id(m): n for n, m in model.named_modules()}
    compared, problems = 0, []
    for module, method in list(_modules_with_quant_method(model)):
        kind = type(getattr(module, "scheme", None) or method).__name__
        if kind not in MICROSCALED:
            continue
        name = names[id(module)]
        refusal = _process_until_repacking(module, method, kind)
        if refusal is not None:
            problems.append(f"{name}: SGLang's {kind}.process_weights_after_loading refuses it: {refusal}")
            continue
        compared += 1
        if hasattr(module, "w13_weight"):  # experts: [E, rows, in/2] codes, one global scale per expert
            shards = [("w13_", module.w13_weight_scale_2), ("w2_", module.w2_weight_scale_2)]
        else:
            shards = [("", module.weight_global_scale.reshape(1))]
        for prefix, global_scale in shards:
            codes, scale = getattr(module, f"{prefix}weight").data, getattr(module, f"{prefix}weight_scale").data
            groups, _ = _sources(f"{name}.{prefix}weight_packed", disk)
            if codes.dim() == 2:
                codes, scale = codes[None], scale[None]
            for index, parts in enumerate(groups):
                values = microscaled.fp4_codes(codes[index])
                rows, cols = values.shape
                factor = scale[index].float() * global_scale[index].float()
                got = (values.reshape(rows, factor.shape[-1], -1) * factor.unsqueeze(-1)).reshape(rows, cols)
                want = torch.cat([microscaled.decode("nvfp4", disk, part) for part in parts], 0)
                error = microscaled.relative_error(got, want)
                if error > microscaled.TOLERANCE:
                    where = f" expert {index}" if len(groups) > 1 else ""
                    problems.append(f"{name}{'.' + prefix.rstrip('_') if prefix else ''}{where}: after SGLang's "
                                    f"{kind}.process_weights_after_loading, the weights it hands the kernel differ "
                                    f"from the checkpoint's {microscaled.part_label(parts)} by up to {error:.2%}")
                    break
    return (f"{compared} NVFP4 layers compared after post-load processing (up to the FP4 Marlin repacking)"
            if compared or problems else ""), problems


# ---------------------------------------------------------------------------------------------------------

def run_case(checkpoint: Path, family: str, kind: str, capability: int, reference: Path | None = None) -> Result:
    """Load ``checkpoint`` through SGLang's model loader at GPU ``capability``; never raises for an engine
    refusal (it becomes a problem line, with the engine's own message). ``reference``: qconvert's
    dequantization of the checkpoint, for the post-load comparison (only when everything loaded)."""
    import_sglang()
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader.loader import DefaultModelLoader, _get_quantization_config, _initialize_model
    from sglang.srt.model_loader.utils import set_default_torch_dtype

    result = Result(ENGINE, VERSION, family, kind, capability)
    warnings = _Warnings()
    sglang_logger = logging.getLogger("sglang")
    sglang_logger.addHandler(warnings)
    try:
        with gpu_capability(capability):
            server_args = _runtime(checkpoint)
            try:
                model_config = ModelConfig.from_server_args(server_args)
                load_config = LoadConfig(load_format="safetensors")
                quant_config = _get_quantization_config(model_config, load_config)
                with set_default_torch_dtype(model_config.dtype), torch.device("cpu"):
                    model = _initialize_model(model_config, load_config, quant_config)
            except Exception as exc:  # the engine refuses the checkpoint: that is the observation
                result.problems.append(f"refused by SGLang: {_one_line(exc)}")
                return result
            result.picks = picks_of(model)
            sentinel = _fill_sentinels(model)
            loader = DefaultModelLoader(load_config)
            try:
                weights = loader._get_all_weights(model_config, model)
                DefaultModelLoader.load_weights_only(model, weights, torch.device("cpu"))
            except Exception as exc:
                result.problems.append(f"load_weights failed: {_one_line(exc)}")
                return result
        result.problems.extend(check_loaded(model, _disk_tensors(checkpoint), sentinel))
        result.problems.extend(check_marlin_types(model, capability))
        result.problems.extend(f"SGLang warned: {line}" for line in warnings.lines if "not found" in line)
        if not result.problems:
            with gpu_capability(capability):
                result.postload, microscaled_problems = check_microscaled(model, _disk_tensors(checkpoint))
            result.problems.extend(microscaled_problems)
        if not result.problems and reference is not None:
            with gpu_capability(capability):
                summary, postload_problems = check_postload(model, _disk_tensors(reference), _block_of(checkpoint))
            result.postload = "; ".join(part for part in (result.postload, summary) if part)
            result.problems.extend(postload_problems)
        result.loaded = not result.problems
        return result
    finally:
        sglang_logger.removeHandler(warnings)


def markdown_table(results: list[Result]) -> str:
    rows = ["| engine | version | kind | family | layer kind | capability | pick | loaded |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        picks = r.picks or {"-": "refused"}
        for layer, pick in picks.items():
            rows.append(f"| {r.engine} | {r.version} | {r.kind} | {r.family} | {layer} | sm{r.capability} | "
                        f"{pick} | {'yes' if r.loaded else 'no'} |")
    return "\n".join(rows)


def write_report(results: list[Result], directory: str | os.PathLike | None = None) -> Path:
    out = Path(directory or os.environ.get("QCONVERT_ENGINES_REPORT", "build/engines"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{ENGINE}.json"
    path.write_text(json.dumps([r.to_json() for r in results], indent=1) + "\n")
    return path
