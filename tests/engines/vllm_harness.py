"""Drive the released vLLM's own code on a checkpoint folder written by qconvert, on a CPU-only machine.

What runs is vLLM's: its config parsing (``ModelConfig`` / ``VllmConfig`` from the folder's config.json, which
builds the ``CompressedTensorsConfig``), its model class for the architecture (``LlamaForCausalLM``,
``DeepseekV3ForCausalLM``) instantiated the way its model loader does (``initialize_model`` under the current
vLLM config, tensor parallel size 1 over gloo), the quantization method each layer's constructor asks
``CompressedTensorsConfig.get_quant_method`` for, the weights iterator of its ``DefaultModelLoader``, the
model's own ``load_weights`` (stacked q/k/v → qkv_proj, gate/up → gate_up_proj, experts → the fused MoE
parameters) and the loader's own ``track_weights_loading`` check.

What is patched, and why (nothing else):
- vLLM runs on its real CPU platform (``VLLM_TARGET_DEVICE=cpu``: there is no GPU here, and its CUDA platform
  module cannot even be imported without libcuda). ``CpuPlatform.get_device_capability`` returns None, for which
  vLLM's compressed-tensors code picks the schemes as if every GPU feature were there; it is patched to return
  the CUDA capability under test (75, 80, 89, 90), so that the capability-dependent scheme choice
  (``_check_scheme_supported``, W8A8-FP8 versus the W8A16-FP8 fallback below sm89, the sm90-only paths) is the
  one a GPU of that capability gets.
- Kernel selection, WNA16 (int weights, bf16 activations; zero points too): vLLM's own choosers
  (``choose_mp_linear_kernel`` for linear layers, ``select_wna16_moe_backend`` for MoE experts) are first asked
  what they pick on a CUDA GPU of the capability under test: the platform's enum reads CUDA for that call and the
  Humming kernels count as installed (``humming-kernels`` is a dependency of vLLM's CUDA wheel); nothing else of
  the choosers is changed. That pick is recorded in ``Result.gpu_kernels`` (e.g. Marlin at sm80, Machete at sm90;
  its own shape checks decide per layer); where they find nothing, vLLM's error is the case's result (vLLM does
  not build the model on that GPU). MoE experts get the GPU's backend (it decides what vLLM's method checks in
  ``create_weights``) with the stand-in experts class; linear layers keep the kernel of this CPU platform (next
  item), whose constructor runs here (the parameters the scheme registers do not depend on the kernel).
- Kernel selection, otherwise: vLLM's own choosers run first (on this platform they pick its CPU kernels, e.g.
  ``CPUWNA16LinearKernel``). Where they find none *on this machine*, ``choose_scaled_mm_linear_kernel`` and
  ``choose_mp_linear_kernel`` return the first of the platform's kernels whose ``can_implement`` accepts the
  layer (its CPU FP8 kernels refuse only because this CPU lacks AMX), else a stand-in class
  (``KernelNotRunHere``; below sm89 vLLM's W8A16-FP8 kernels exist for CUDA only: Marlin FP8, sm75+). The MoE
  backend selector for int8 experts, whose CPU backends cannot run here, falls back to Triton (the first
  backend vLLM's CUDA priority list offers for NVIDIA sm80-sm90); those for NVFP4 and MXFP8 experts to Marlin.
  NVFP4 / MXFP4 / MXFP8 linear layers ask ``init_{nvfp4,mxfp4,mxfp8}_linear_kernel``, which
  finds nothing on this platform (its lists are CUDA / ROCm / XPU only), and get the stand-in. The kernel only
  matters after loading (repacking and matmuls), and no kernel runs in this tier (ModelOpt's NVFP4 / FP8 methods,
  for released checkpoints, get the same stand-ins through their module's names): what is compared with the
  checkpoint is each parameter exactly as the weight loaders filled it. The kernel chosen for each layer kind is
  recorded in ``Result.kernels``.
- Post-load processing (``process_weights_after_loading``) runs only for the microscaled layers (NVFP4, MXFP4,
  MXFP8), whose scheme-level steps before the GPU repacking decide the weights computed with (NVFP4's global
  scales folded to one per fused layer / per expert): ``check_postload`` runs them (the stand-in kernel's own
  step does nothing; the NVFP4 MoE method's conversion to a kernel format is replaced by a capture of its
  arguments) and compares the result, dequantized, with the checkpoint decoded on its own.
- Distributed state: one process, world size 1 over gloo; the model-parallel groups are re-made when a MoE
  model follows a dense one (vLLM makes its expert-parallel group only for MoE models).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

VERSION = "0.33.0"
ENGINE = "vllm"
CAPABILITIES = (75, 80, 89, 90)

# Byte patterns every parameter is filled with before a load (two loads, one per pattern): a byte that holds
# the first pattern after the first load and the second after the second was written by no weight loader.
_SENTINELS = (0x5A, 0xA5)

_state: dict[str, Any] = {"capability": 90, "gpu_kernels": []}


@dataclass
class Result:
    engine: str
    version: str
    family: str  # "llama" | "deepseek", or the model_type (tests/engines/test_vllm_architectures.py)
    kind: str  # output kind, as in qconvert.serving (e.g. "fp8-block", "fp8+fnuz", "mixed:fp8-block+rtn4")
    capability: int
    picks: dict[str, str] = field(default_factory=dict)  # layer kind → scheme / method class name
    loaded: bool = False
    problems: list[str] = field(default_factory=list)
    kernels: dict[str, str] = field(default_factory=dict)  # layer kind → kernel vLLM chose on this CPU platform
    # layer kind → what vLLM's own chooser picks on a CUDA GPU of this capability (WNA16 linear kernels, WNA16 MoE
    # backends; see _on_gpu_first)
    gpu_kernels: dict[str, str] = field(default_factory=dict)
    # After vLLM's own process_weights_after_loading, where it runs on a CPU (NVFP4, MXFP4, MXFP8 layers): the
    # weights vLLM computes with, dequantized, against the checkpoint's tensors decoded here ("" when not run).
    postload: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def unavailable_reason() -> str | None:
    """Why the released vLLM cannot be driven here (None when it can)."""
    try:
        from importlib.metadata import version

        found = version("vllm")
    except Exception:  # PackageNotFoundError, or a broken install
        return "vLLM is not installed here (make engines runs this module in tests/engines/setup_vllm.sh's venv)"
    if found != VERSION:
        return f"vLLM {found} is installed; the conformance tier pins {VERSION}"
    return None


def bootstrap() -> None:
    """Select vLLM's CPU platform with the capability query patched; once per process, before vLLM's modules
    that read ``current_platform`` at import."""
    if _state.get("booted"):
        return
    os.environ["VLLM_TARGET_DEVICE"] = "cpu"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import vllm.platforms as platforms
    from vllm.platforms.cpu import CpuPlatform
    from vllm.platforms.interface import DeviceCapability

    def capability(cls: type, device_id: int = 0) -> DeviceCapability:
        return DeviceCapability(major=_state["capability"] // 10, minor=_state["capability"] % 10)

    CpuPlatform.get_device_capability = classmethod(capability)  # type: ignore[method-assign,assignment]
    platforms._current_platform = CpuPlatform()
    _patch_kernel_choosers()
    _state["booted"] = True


class KernelNotRunHere:
    """Stand-in for a GPU kernel vLLM would pick on a real GPU: constructed, never run (see module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    def input_quant_key(self) -> None:  # (NVFP4 linear layers ask their kernel; none is pre-quantized here)
        return None

    def process_weights_after_loading(self, layer: Any) -> None:
        """The GPU kernel's own repacking (Marlin, FlashInfer, ...): not run here; the scheme's steps before it
        (renames, NVFP4 global scales folded across fused shards) are (``check_postload``)."""


def _patch_kernel_choosers() -> None:
    from vllm.model_executor.kernels import linear
    from vllm.platforms import current_platform

    def fallback(real: Any) -> Any:
        def choose(*args: Any, **kwargs: Any) -> Any:
            try:
                return real(*args, **kwargs)
            except ValueError as error:
                if "Failed to find a kernel" not in str(error):
                    raise
                _state.setdefault("kernel_failures", []).append(" ".join(str(error).split())[:300])
            # This CPU lacks what the platform's kernels check for (AMX): take the first of them that can
            # implement the layer's configuration, as on a CPU that has it; else the stand-in.
            config = kwargs.get("config", args[0] if args else None)
            possible = kwargs.get("possible_kernels", args[1] if len(args) > 1 else None)
            for kernel in (possible or {}).get(current_platform._enum, []):
                try:
                    if kernel.can_implement(config)[0]:
                        return kernel
                except Exception:  # a kernel's own check that needs its hardware
                    continue
            return KernelNotRunHere
        return choose

    linear.choose_scaled_mm_linear_kernel = fallback(linear.choose_scaled_mm_linear_kernel)
    linear.choose_mp_linear_kernel = _on_gpu_first(linear.choose_mp_linear_kernel,
                                                   fallback(linear.choose_mp_linear_kernel))

    # MoE experts backends. WNA16: vLLM's own selector as on a CUDA GPU of the capability under test
    # (_on_gpu_first). int8: on this CPU platform vLLM offers only its CPU backends, which cannot run here; where
    # they refuse, fall back to the backend vLLM's CUDA priority list offers first for NVIDIA sm80-sm90 (Triton:
    # the weight layout a GPU would load), with the stand-in kernel class.
    from vllm.model_executor.layers.fused_moe.oracle.int8 import Int8MoeBackend
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        compressed_tensors_moe_w8a8_int8 as int8_moe,
    )
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        compressed_tensors_moe_wna16 as wna16_moe,
    )

    def moe_fallback(real: Any, backend: Any) -> Any:
        def select(*args: Any, **kwargs: Any) -> Any:
            try:
                return real(*args, **kwargs)
            except (NotImplementedError, ValueError) as error:
                _state.setdefault("kernel_failures", []).append(" ".join(str(error).split())[:300])
                return backend, KernelNotRunHere
        return select

    wna16_moe.select_wna16_moe_backend = _on_gpu_first(wna16_moe.select_wna16_moe_backend, None)
    int8_moe.select_int8_moe_backend = moe_fallback(int8_moe.select_int8_moe_backend, Int8MoeBackend.TRITON)
    # NVFP4 and MXFP8 experts: Marlin, the first backend of vLLM's lists that serves NVIDIA sm80-sm90 (the
    # FlashInfer / CUTLASS / DeepGEMM ones before it are sm100+). MXFP4 experts need no fallback: vLLM's method
    # picks CUTLASS only where the device supports it, else Marlin, without a selector that can fail.
    from vllm.model_executor.layers.fused_moe.oracle.fp8 import Fp8MoeBackend
    from vllm.model_executor.layers.fused_moe.oracle.nvfp4 import NvFp4MoeBackend
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        compressed_tensors_moe_w4a4_nvfp4 as nvfp4_moe,
    )
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        compressed_tensors_moe_w8a8_mxfp8 as mxfp8_moe,
    )

    nvfp4_moe.select_nvfp4_moe_backend = moe_fallback(nvfp4_moe.select_nvfp4_moe_backend, NvFp4MoeBackend.MARLIN)
    mxfp8_moe.select_mxfp8_moe_backend = moe_fallback(mxfp8_moe.select_mxfp8_moe_backend, Fp8MoeBackend.MARLIN)

    # NVFP4 / MXFP4 / MXFP8 linear layers: the scheme's constructor (NVFP4, MXFP4) or create_weights (MXFP8) asks
    # init_{nvfp4,mxfp4,mxfp8}_linear_kernel, which on this platform finds no kernel (vLLM's lists for them are
    # CUDA / ROCm / XPU only; the NVFP4 weight-only path forces Marlin, which checks for CUDA). Where it raises,
    # the stand-in is returned; it keeps what the scheme asked for (MXFP4: ``activation_quant_key``).
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
        compressed_tensors_w4a4_mxfp4 as mxfp4_scheme,
    )
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
        compressed_tensors_w4a4_nvfp4 as nvfp4_scheme,
    )
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
        compressed_tensors_w8a8_mxfp8 as mxfp8_scheme,
    )

    def linear_fallback(real: Any) -> Any:
        def init(*args: Any, **kwargs: Any) -> Any:
            try:
                return real(*args, **kwargs)
            except ValueError as error:
                if "kernel" not in str(error).lower():
                    raise
                _state.setdefault("kernel_failures", []).append(" ".join(str(error).split())[:300])
                return KernelNotRunHere(*args, **kwargs)
        return init

    for module, name in ((nvfp4_scheme, "init_nvfp4_linear_kernel"), (mxfp4_scheme, "init_mxfp4_linear_kernel"),
                         (mxfp8_scheme, "init_mxfp8_linear_kernel")):
        setattr(module, name, linear_fallback(getattr(module, name)))

    # ModelOpt's NVFP4 and FP8 methods (the released checkpoints tests/engines/test_vllm_released.py reads) ask the
    # same kernel choosers through their own module's names: the same stand-ins, the same MoE fallbacks.
    from vllm.model_executor.layers.quantization import modelopt

    for name in ("init_nvfp4_linear_kernel", "init_fp8_linear_kernel"):
        setattr(modelopt, name, linear_fallback(getattr(modelopt, name)))
    modelopt.select_nvfp4_moe_backend = moe_fallback(modelopt.select_nvfp4_moe_backend, NvFp4MoeBackend.MARLIN)
    modelopt.select_fp8_moe_backend = moe_fallback(modelopt.select_fp8_moe_backend, Fp8MoeBackend.MARLIN)


@contextlib.contextmanager
def _as_on_a_gpu() -> Iterator[None]:
    """vLLM's platform as its kernel choosers see a CUDA GPU of the capability under test: the platform's enum
    (``is_cuda()``; ``get_device_capability`` is already the capability under test) and the Humming kernels
    present (``humming-kernels`` is a dependency of vLLM's CUDA wheel; this CPU venv does not have it)."""
    from vllm.model_executor.kernels.linear.mixed_precision import humming as linear_humming
    from vllm.model_executor.layers.fused_moe.experts import fused_humming_moe as moe_humming
    from vllm.platforms import PlatformEnum, current_platform

    modules = (linear_humming, moe_humming)
    saved = [module.has_humming for module in modules]
    current_platform._enum = PlatformEnum.CUDA  # an instance attribute over CpuPlatform's class attribute
    for module in modules:
        module.has_humming = lambda: True
    try:
        yield
    finally:
        del current_platform._enum
        for module, real in zip(modules, saved, strict=True):
            module.has_humming = real


def _on_gpu_first(real: Any, on_this_cpu: Any) -> Any:
    """A kernel chooser that first asks vLLM's own ``real`` chooser what it picks on a CUDA GPU of the capability
    under test (``_as_on_a_gpu``), and records that (``Result.gpu_kernels``); where it finds nothing, vLLM's
    error is raised, as vLLM raises it on that GPU (the model is not built: the case does not load).

    - ``choose_mp_linear_kernel`` (WNA16 linear layers): the GPU's kernel class is recorded only; the layer gets
      ``on_this_cpu``'s kernel (vLLM's CPU kernel or the stand-in), since a GPU kernel's constructor is not run
      here; the parameters the scheme registers do not depend on the kernel.
    - ``select_wna16_moe_backend`` (``on_this_cpu`` None): the GPU's backend is handed to vLLM's MoE method (it
      decides what ``create_weights`` checks), with the stand-in experts class.
    """

    def choose(*args: Any, **kwargs: Any) -> Any:
        key = kwargs.get("config", args[0] if args else None)
        with _as_on_a_gpu():
            try:
                if on_this_cpu is not None:  # the capability the chooser reads is the patched one
                    picked = real(*args, **kwargs)
                    _state["gpu_kernels"].append((key, picked.__name__))
                    return on_this_cpu(*args, **kwargs)
                try:
                    backend, experts = real(*args, **kwargs)
                    picked = f"{backend.value} ({experts.__name__})"
                except ModuleNotFoundError as error:
                    # Humming's experts passed vLLM's scheme and device checks; which of its classes serves the
                    # layer is asked of the humming package itself, which this CPU venv lacks.
                    if error.name != "humming":
                        raise
                    from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import WNA16MoEBackend

                    backend, picked = WNA16MoEBackend.HUMMING, "HUMMING (experts class: the humming package's pick)"
                _state["gpu_kernels"].append((key, picked))
                return backend, KernelNotRunHere
            except (ValueError, NotImplementedError) as error:
                raise type(error)(f"on CUDA sm{_state['capability']}: {error}") from error
    return choose


def set_capability(capability: int) -> None:
    _state["capability"] = capability


def _init_distributed(vllm_config: Any) -> None:
    """One process, world size 1 over gloo; the model-parallel groups are made again when a MoE model follows
    a dense one (vLLM creates the expert-parallel group only for MoE models)."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import destroy_model_parallel, init_distributed_environment, initialize_model_parallel

    moe = bool(vllm_config.model_config.is_moe)
    if _state.get("moe") == moe:
        return
    with set_current_vllm_config(vllm_config):
        if "moe" not in _state:
            handle, path = tempfile.mkstemp(prefix="qconvert-vllm-dist-")
            os.close(handle)
            os.unlink(path)
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method=f"file://{path}")
        else:
            destroy_model_parallel()
        initialize_model_parallel(1, 1)
    _state["moe"] = moe


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if not text and error.__traceback__ is not None:  # a bare assert: say which one
        import traceback

        frame = traceback.extract_tb(error.__traceback__)[-1]
        text = f"{Path(frame.filename).name}:{frame.lineno}: {frame.line}"
    return f"{type(error).__name__}: {text[:600]}"


def model_config(folder: Path, max_model_len: int | None = 256) -> Any:
    """vLLM's ModelConfig for the folder (parses config.json, incl. quantization_config); one per checkpoint.
    ``max_model_len=None``: the one vLLM derives from the config (tiny models may allow fewer than 256)."""
    bootstrap()
    from vllm.config import ModelConfig

    return ModelConfig(model=str(folder), dtype="bfloat16", enforce_eager=True, max_model_len=max_model_len, seed=0)


# Modules of a multimodal model's vision tower and projector (qconvert leaves them unquantized): their layer
# kinds are named "vision:<leaf>", apart from the language model's.
_VISION_PREFIXES = ("visual.", "vision_tower.", "multi_modal_projector.", "vision_model.")


def _layer_kind(module_name: str) -> str:
    leaf = module_name.rsplit(".", 1)[-1]
    kind = "experts" if leaf in ("experts", "routed_experts") else leaf
    vision = any(module_name.startswith(p) or f".{p}" in module_name for p in _VISION_PREFIXES)
    return f"vision:{kind}" if vision else kind


def _disk_tensors(folder: Path) -> dict[str, Any]:
    from safetensors import safe_open

    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def _fill(model: Any, byte: int) -> None:
    import torch

    for param in model.parameters():
        param.data.reshape(-1).view(torch.uint8).fill_(byte)


def _load(model: Any, mc: Any, loader: Any) -> set[str]:
    loaded = model.load_weights(loader.get_all_weights(mc, model))
    # The loader's own strict check (the one vLLM runs for unquantized models by default): every parameter
    # of a quantized layer must have come from the checkpoint, save those no checkpoint can fill (below).
    loader.track_weights_loading(model, set(loaded) | _never_read(model), quantized=True)
    return set(loaded)


def _streamed_experts(model: Any) -> tuple[str, Any] | None:
    """The submodule (prefix, module) whose own ``load_weights`` streams per-expert checkpoint tensors into its
    fused-MoE parameters (vLLM's gpt-oss: ``experts.<e>.w13_weight_packed``), found by vLLM's parser for them."""
    for name, module in model.named_modules():
        if hasattr(type(module), "_get_streamed_expert_info"):
            return (f"{name}." if name else ""), module
    return None


def _never_read(model: Any) -> set[str]:
    """Parameters a checkpoint cannot fill and vLLM never reads:

    - the ``w13_weight_shape`` / ``w2_weight_shape`` that vLLM's WNA16 MoE method registers (``create_weights``;
      nothing in vLLM 0.33.0 reads them) in a model whose streamed-expert loader has no checkpoint name for them
      (gpt-oss: ``_GPT_OSS_STREAMED_EXPERT_SUFFIX_TO_SHARD`` maps weights, scales and biases only). Elsewhere
      (Mixtral-style loaders) they must be filled.
    - the ``w13_input_global_scale`` / ``w2_input_global_scale`` that vLLM's NVFP4 MoE method registers whatever
      the activations (``CompressedTensorsW4A4Nvfp4MoEMethod.create_weights``): a weight-only (NVFP4A16)
      checkpoint has none, and the weight-only backends drop them (``convert_to_nvfp4_moe_kernel_format``, Marlin:
      ``a13_scale = a2_scale = None``; ``make_nvfp4_moe_quant_config``: ``nvfp4_w4a16_moe_quant_config`` takes no
      activation scale). vLLM's loader does not check a quantized model's parameters by default, so it loads.
    """
    never: set[str] = set()
    for prefix, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if type(method).__name__ == "CompressedTensorsW4A4Nvfp4MoEMethod" and getattr(method, "use_a16", False):
            never |= {f"{prefix}.{leaf}" for leaf in ("w13_input_global_scale", "w2_input_global_scale")}
    streamed = _streamed_experts(model)
    if streamed is None:
        return never
    import importlib

    module = importlib.import_module(type(streamed[1]).__module__)
    suffixes = getattr(module, "_GPT_OSS_STREAMED_EXPERT_SUFFIX_TO_SHARD", None)
    if suffixes is None:
        return never
    return never | {name for name, _ in model.named_parameters()
                    if name.rpartition(".")[2] in ("w13_weight_shape", "w2_weight_shape")
                    and name.rpartition(".")[2] not in suffixes}


def _streamed_sources(model: Any, disk: dict[str, Any]) -> dict[str, list[str]]:
    """vLLM parameter → the per-expert checkpoint tensors vLLM's own streamed-expert parser routes to it, in
    expert order (every expert must be there)."""
    streamed = _streamed_experts(model)
    if streamed is None:
        return {}
    prefix, module = streamed
    params = dict(module.named_parameters())
    found: dict[str, dict[int, str]] = {}
    for disk_name in disk:
        if not disk_name.startswith(prefix):
            continue
        info = type(module)._get_streamed_expert_info(disk_name.removeprefix(prefix), params)
        if info is not None:
            expert, fused_name, _ = info
            found.setdefault(prefix + fused_name, {})[expert] = disk_name
    return {name: [by_expert[e] for e in sorted(by_expert)] for name, by_expert in found.items()}


def _exempt_modules(model: Any) -> set[str]:
    """Modules whose parameters a checkpoint need not carry: KV-cache scales (vLLM defaults them when the
    checkpoint has none, as its loader's own check allows; qconvert writes no KV-cache quantization)."""
    from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod

    return {name for name, m in model.named_modules()
            if isinstance(getattr(m, "quant_method", None), BaseKVCacheMethod)}


def _expected(model: Any, disk: dict[str, Any]) -> Iterator[tuple[str, list[list[str]], bool]]:
    """For each parameter: the checkpoint tensors it is made of, as vLLM's mapping data says (the model's
    ``packed_modules_mapping`` for fused layers, its ``get_expert_mapping`` for MoE experts): a list of
    row-groups (experts; one group for a plain layer), each a list of parts concatenated along dim 0, and
    whether any one part may be the value (``weight_shape``: a fused layer keeps one part's shape)."""
    packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
    streamed = _streamed_sources(model, disk)
    expert_map = model.get_expert_mapping() if hasattr(model, "get_expert_mapping") else _experts_mapping(model)
    sources = _sources(model, disk)
    never_read = _never_read(model)

    def on_disk(groups: list[list[str]]) -> list[list[str]]:
        """vLLM-side names → the checkpoint's (through the model's ``hf_to_vllm_mapper``, where it has one)."""
        return [[n for part in group for n in sources.get(part, [part])] for group in groups]

    for name, _ in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        prefix, _, mod_leaf = module.rpartition(".")
        any_part = leaf == "weight_shape" or leaf.endswith("_weight_shape")
        if name in never_read:
            continue
        if name in streamed:
            yield name, [[n] for n in streamed[name]], any_part
        elif streamed and name in sources:  # e.g. gpt-oss's 3-D expert biases, renamed by its mapper
            yield name, [sources[name]], any_part
        elif mod_leaf in ("experts", "routed_experts") and expert_map:
            by_expert: dict[int, list[tuple[int, str]]] = {}
            for param_name, weight_name, expert, shard in expert_map:
                at = name.find(f".{param_name}")
                if at >= 0:  # e.g. model.layers.1.mlp + experts.routed_experts.w13_ + weight_packed
                    suffix = name[at + 1 + len(param_name):]
                    order = {"w1": 0, "w3": 1, "w2": 0}[shard]
                    by_expert.setdefault(expert, []).append((order, f"{name[:at]}.{weight_name}{suffix}"))
            groups = [[n for _, n in sorted(parts)] for _, parts in sorted(by_expert.items())]
            yield name, on_disk(groups or [[name]]), any_part
        elif mod_leaf in packed and name not in disk and name not in sources:
            # (a checkpoint that already holds the fused layer, e.g. Phi-3's qkv_proj, is loaded as it is)
            yield name, on_disk([[f"{prefix}.{part}.{leaf}" for part in packed[mod_leaf]]]), any_part
        else:
            yield name, on_disk([[name]]), any_part


def _experts_mapping(model: Any) -> list[tuple[str, str, int, str]]:
    """For models without ``get_expert_mapping`` (their experts load through the MoE runner's own
    ``load_weights``, e.g. Qwen3-MoE, Mixtral): vLLM's model-wide expert mapping, made by its own
    ``RoutedExperts.make_expert_params_mapping`` from the experts layer's checkpoint names."""
    try:
        from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    except ImportError:
        return []
    layer = next((m for m in model.modules() if isinstance(m, RoutedExperts)), None)
    if layer is None:
        return []
    return RoutedExperts.make_expert_params_mapping(model, layer.ckpt_gate_proj_name, layer.ckpt_down_proj_name,
                                                    layer.ckpt_up_proj_name, layer.moe_config.num_logical_experts)


def _sources(model: Any, disk: dict[str, Any]) -> dict[str, list[str]]:
    """vLLM parameter name → the checkpoint names the model's own ``hf_to_vllm_mapper`` maps onto it (several,
    in shard order, where the mapper stacks them, e.g. a vision tower's q/k/v → qkv); only renamed names."""
    # The model's mapper, or where it has none (GraniteMoE) its inner model's, which that module's own
    # load_weights applies to the names below its prefix.
    mappers = [("", getattr(model, "hf_to_vllm_mapper", None))]
    if mappers[0][1] is None:
        mappers = [(f"{name}.", getattr(child, "hf_to_vllm_mapper", None))
                   for name, child in model.named_children()]
    from vllm.model_executor.model_loader.weight_utils import maybe_remap_moe_expert_param_name

    params = dict(model.named_parameters())
    shards: dict[str, list[tuple[int, str]]] = {}
    seen: set[str] = set()
    for prefix, mapper in mappers:
        if mapper is None:
            continue
        order = {str(shard): i for i, (_, shard) in enumerate(mapper.orig_to_new_stacked.values())}
        for disk_name in disk:
            if not disk_name.startswith(prefix) or disk_name in seen:
                continue  # (a name the outer mapper renamed is not renamed again)
            mapped = mapper._map_name_with_shard(disk_name.removeprefix(prefix))
            if mapped is None or prefix + mapped[0] == disk_name:
                continue
            # (and vLLM's own remapping of expert parameters into `experts.routed_experts.*`)
            target = maybe_remap_moe_expert_param_name(prefix + mapped[0], params)
            seen.add(disk_name)
            shards.setdefault(target, []).append((order.get(str(mapped[1]), 0), disk_name))
    return {name: [n for _, n in sorted(parts)] for name, parts in shards.items()}


def _compare(name: str, got: Any, groups: list[list[str]], any_part: bool, disk: dict[str, Any]) -> str | None:
    import torch

    missing = [n for g in groups for n in g if n not in disk]
    if missing:
        return f"{name}: filled by vLLM, but the checkpoint has no {missing[0]} (what vLLM's mapping expects)"
    if any_part:  # one row per expert (or the whole parameter), each equal to one of its parts
        rows = [got] if len(groups) == 1 else list(got)
        if len(rows) != len(groups):
            return f"{name}: {len(rows)} rows in vLLM, {len(groups)} experts in the checkpoint"
        for row, group in zip(rows, groups, strict=True):
            if not any(row.shape == disk[n].shape and torch.equal(row, disk[n].to(row.dtype)) for n in group):
                return f"{name}: {row.tolist()} equals none of {group}"
        return None
    rows = []
    for group in groups:
        parts = [disk[n] for n in group]
        if all(p.numel() == 1 for p in parts) and len(parts) > 1:  # per-tensor scales of fused parts
            rows.append(torch.stack([p.reshape(()) for p in parts]))
        else:
            rows.append(torch.cat([p.reshape(1) if p.dim() == 0 else p for p in parts], dim=0))
    want = rows[0] if len(groups) == 1 else torch.stack(rows)
    if want.shape != got.shape and want.dim() >= 2 and want.transpose(-1, -2).shape == got.shape:
        want = want.transpose(-1, -2)  # vLLM keeps some MoE parameters transposed ([E, in, out])
    if want.numel() == got.numel() and want.shape != got.shape:
        want = want.reshape(got.shape)  # e.g. a scalar scale held as [1]
    if (want.dim() == got.dim() + 1 and want.shape[:-1] == got.shape and name.endswith("w13_input_scale")
            and bool((want == want[..., :1]).all())):
        # vLLM's MoE methods keep one static input scale per expert for w13: gate and up read one activation, so
        # both parts' values land in one slot. Checked where the parts agree (a disagreement is reported below).
        want = want[..., 0].contiguous()
    if want.shape != got.shape:
        return f"{name}: shape {tuple(got.shape)} in vLLM, {tuple(want.shape)} from {groups[0]}"
    if want.dtype != got.dtype:
        converted = want.to(got.dtype)
        if want.is_floating_point() and got.is_floating_point():
            back = converted.to(want.dtype)
            changed = int((back.view(-1) != want.view(-1)).sum()) - int(torch.isnan(want).sum())
            if changed:
                return (f"{name}: vLLM holds {got.dtype}, the checkpoint {want.dtype}: {changed} of {want.numel()} "
                        "values change in the copy")
        want = converted
    if not torch.equal(got.view(-1).view(torch.uint8) if got.dtype.is_floating_point else got,
                       want.view(-1).view(torch.uint8) if want.dtype.is_floating_point else want):
        diff = int((got.float() != want.float()).sum())
        return f"{name}: {diff} of {got.numel()} values differ from the checkpoint ({groups[0][0]}...)"
    return None


def run_case(folder: Path, family: str, kind: str, capability: int, mc: Any | None = None) -> Result:
    """Instantiate vLLM's model for the checkpoint at ``capability`` and load every tensor through its loaders."""
    result = Result(ENGINE, VERSION, family, kind, capability)
    bootstrap()
    set_capability(capability)
    import torch
    from vllm.config import DeviceConfig, LoadConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    _state["gpu_kernels"] = []
    try:
        mc = mc if mc is not None else model_config(folder)
        vc = VllmConfig(model_config=mc, device_config=DeviceConfig(device="cpu"), load_config=LoadConfig())
        _init_distributed(vc)
        with set_current_vllm_config(vc), set_default_torch_dtype(torch.bfloat16), torch.device("cpu"):
            model = initialize_model(vllm_config=vc)
    except Exception as error:  # the engine's refusal is the observation
        result.problems.append(_one_line(error))
        return result

    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None or name.endswith(".attn") or name.endswith("embed_tokens") or name == "lm_head":
            continue
        if "Embedding" in type(method).__name__:  # other models' embeddings and (tied) LM heads
            continue
        scheme = getattr(module, "scheme", None)
        pick = type(scheme if scheme is not None else method).__name__
        layer = _layer_kind(name)
        previous = result.picks.get(layer)
        result.picks[layer] = pick if previous in (None, pick) else "|".join(sorted({*previous.split("|"), pick}))
        kernel = getattr(module, "kernel", None) or getattr(scheme, "kernel", None) \
            or getattr(scheme, "fp8_linear", None) or getattr(method, "kernel", None)
        # what the GPU chooser picked for this layer's kernel configuration (MoE: for its FusedMoEConfig)
        keys = [getattr(kernel, "config", None), getattr(method, "moe", None)]
        if isinstance(kernel, KernelNotRunHere):
            keys.append(kernel.args[0] if kernel.args else kernel.kwargs.get("config"))
        gpu = [picked for config, picked in _state["gpu_kernels"] if any(config is k for k in keys if k is not None)]
        if gpu:
            seen = result.gpu_kernels.get(layer)
            result.gpu_kernels[layer] = gpu[-1] if seen in (None, gpu[-1]) else "|".join(sorted({*seen.split("|"),
                                                                                                  gpu[-1]}))
        if kernel is not None:
            result.kernels[layer] = type(kernel).__name__
            asked = getattr(kernel, "kwargs", {}).get("activation_quant_key") if isinstance(
                kernel, KernelNotRunHere) else None
            if asked is not None:  # e.g. the MXFP4 scheme asks for dynamic MXFP4 activations, whatever the config
                result.kernels[layer] += f" (activation_quant_key={asked})"

    loader = DefaultModelLoader(vc.load_config)
    snapshots = []
    try:
        with set_current_vllm_config(vc):
            for byte in _SENTINELS:
                _fill(model, byte)
                _load(model, mc, loader)
                snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    except Exception as error:
        result.problems.append(_one_line(error))
        return result

    exempt = _exempt_modules(model)
    disk = _disk_tensors(folder)
    used: set[str] = set()
    first, second = snapshots
    for name, groups, any_part in _expected(model, disk):
        if name.rpartition(".")[0] in exempt:
            continue
        a = first[name].reshape(-1).view(torch.uint8)
        b = second[name].reshape(-1).view(torch.uint8)
        untouched = int(((a == _SENTINELS[0]) & (b == _SENTINELS[1])).sum())
        if untouched:
            result.problems.append(f"{name}: {untouched} of {a.numel()} bytes never written by vLLM's loaders")
            continue
        if not torch.equal(a, b):
            result.problems.append(f"{name}: two loads of the same checkpoint gave different values")
            continue
        used.update(n for g in groups for n in g)
        problem = _compare(name, second[name], groups, any_part, disk)
        if problem:
            result.problems.append(problem)
    for name in sorted(set(disk) - used):
        result.problems.append(f"{name}: on disk, but no parameter of vLLM's model holds it")
    if not result.problems:
        with set_current_vllm_config(vc):
            result.postload, problems = check_postload(model, disk)
        result.problems.extend(problems)
    result.loaded = not result.problems
    return result


# ---------------------------------------------------------------------------------------------------------------
# After vLLM's post-load processing: what it computes with, against the checkpoint (microscaled formats).
# ---------------------------------------------------------------------------------------------------------------

# Linear schemes and MoE methods whose layers check_postload follows; the rest keep their existing checks only.
_MICROSCALED_SCHEMES = {"CompressedTensorsW4A4Fp4": "nvfp4", "CompressedTensorsW4A4Mxfp4": "mxfp4",
                        "CompressedTensorsW8A8Mxfp8": "mxfp8"}
_MICROSCALED_MOE = {"CompressedTensorsW4A4Nvfp4MoEMethod": "nvfp4", "CompressedTensorsW4A4Mxfp4MoEMethod": "mxfp4",
                    "CompressedTensorsW8A8Mxfp8MoEMethod": "mxfp8"}


def _vllm_weight(fmt: str, codes: Any, scale: Any, global_scale: Any = None) -> Any:
    """What vLLM computes with, dequantized by vLLM's own helpers (its emulation paths' functions)."""
    import torch
    from vllm.model_executor.layers.quantization.utils.mxfp8_utils import dequant_mxfp8_to_bf16
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import (
        break_fp4_bytes,
        dequantize_to_dtype,
    )

    if fmt == "nvfp4":
        return dequantize_to_dtype(codes, scale, global_scale, torch.float32, block_size=16, swizzle=False)
    if fmt == "mxfp8":
        return dequant_mxfp8_to_bf16(codes, scale).float()
    weight = break_fp4_bytes(codes, torch.float32)  # (vLLM's MXFP4 dequantizer needs amd-quark: same E2M1 codes)
    rows, cols = weight.shape
    factor = torch.exp2(scale.float() - 127)
    return (weight.reshape(rows, -1, 32) * factor.unsqueeze(-1)).reshape(rows, cols)


class _Captured(Exception):
    """Raised by the stand-in of a MoE method's GPU-format conversion, with the arguments vLLM passed it."""

    def __init__(self, arguments: dict) -> None:
        super().__init__("captured")
        self.arguments = arguments


def _moe_inputs(method: Any, layer: Any) -> dict[str, Any] | str:
    """Run a microscaled MoE method's process_weights_after_loading up to its conversion into the GPU kernel's
    format, and return what it hands that conversion (NVFP4: the scales vLLM folded), or why it cannot."""
    import importlib

    module = importlib.import_module(type(method).__module__)
    name = "convert_to_nvfp4_moe_kernel_format"
    real = getattr(module, name, None)
    if real is None:
        return "no conversion to capture"

    def capture(*args: Any, **kwargs: Any) -> Any:
        raise _Captured(kwargs)

    setattr(module, name, capture)
    try:
        method.process_weights_after_loading(layer)
    except _Captured as captured:
        return captured.arguments
    except Exception as error:
        return _one_line(error)
    finally:
        setattr(module, name, real)
    return "the conversion was not called"


def check_postload(model: Any, disk: dict[str, Any]) -> tuple[str, list[str]]:
    """For NVFP4 / MXFP4 / MXFP8 layers: run vLLM's own process_weights_after_loading (the scheme's steps; the GPU
    kernel's repacking is the stand-in's no-op) and compare the weights vLLM then computes with, dequantized by
    vLLM's helpers, with each checkpoint part decoded on its own (``microscaled.decode``). This is where a
    per-part NVFP4 global scale that vLLM folds into one per fused layer shows: CompressedTensorsW4A4Fp4 keeps
    the largest of the parts' global scales (q/k/v, gate/up, DeepSeek's q_a + kv_a: only a warning), and
    CompressedTensorsW4A4Nvfp4MoEMethod keeps gate's for gate and up (``w13_weight_global_scale[:, 0]``).
    MoE experts: NVFP4 only (MXFP4 / MXFP8 experts go from the loaded tensors, compared byte for byte already,
    straight to the GPU kernel's repacking). Returns (summary, problems)."""
    import torch

    from tests.engines import microscaled

    expected = {name: groups for name, groups, _ in _expected(model, disk)}
    compared, skipped, problems = 0, {}, []
    for prefix, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        scheme = getattr(module, "scheme", None)
        fmt = _MICROSCALED_SCHEMES.get(type(scheme).__name__) or _MICROSCALED_MOE.get(type(method).__name__)
        if fmt is None:
            continue
        kind = type(scheme if scheme is not None else method).__name__
        if scheme is not None:  # a linear layer: its scheme's processing, then the stand-in kernel's (nothing)
            parts = expected[f"{prefix}.{microscaled.VALUES[fmt]}"][0]
            try:
                method.process_weights_after_loading(module)
            except Exception as error:
                skipped.setdefault(kind, _one_line(error))
                continue
            got = _vllm_weight(fmt, module.weight.data, module.weight_scale.data,
                               getattr(module, "weight_global_scale", None))
            want = torch.cat([microscaled.decode(fmt, disk, part) for part in parts], 0)
            compared += 1
            error = microscaled.relative_error(got, want)
            if error > microscaled.TOLERANCE:
                problems.append(f"{prefix}: after vLLM's {kind}.process_weights_after_loading, the weights it "
                                f"computes with differ from the checkpoint's {microscaled.part_label(parts)} by up "
                                f"to {error:.2%} of the largest weight")
            continue
        if fmt != "nvfp4":
            skipped.setdefault(kind, "loaded tensors go to the GPU kernel's repacking unchanged")
            continue
        inputs = _moe_inputs(method, module)
        if isinstance(inputs, str):
            skipped.setdefault(kind, inputs)
            continue
        compared += 1
        for shard in ("w13", "w2"):
            groups = expected[f"{prefix}.{shard}_weight_packed"]
            codes, scale, scale_2 = inputs[shard], inputs[f"{shard}_scale"], inputs[f"{shard}_scale_2"]
            for expert, parts in enumerate(groups):
                got = _vllm_weight("nvfp4", codes[expert], scale[expert], scale_2[expert])
                want = torch.cat([microscaled.decode("nvfp4", disk, part) for part in parts], 0)
                error = microscaled.relative_error(got, want)
                if error > microscaled.TOLERANCE:
                    problems.append(f"{prefix}.{shard}: after vLLM's {kind}.process_weights_after_loading, expert "
                                    f"{expert}'s weights it computes with differ from the checkpoint's "
                                    f"{microscaled.part_label(parts)} by up to {error:.2%} of the largest weight "
                                    "(vLLM keeps one global scale per expert and shard)")
                    break
    if not compared and not skipped:
        return "", []
    summary = f"{compared} layers compared after post-load processing"
    if skipped:
        summary += "; not run on a CPU: " + "; ".join(f"{k} ({v})" for k, v in sorted(skipped.items()))
    return summary, problems


def loaded_parameters(folder: Path, capability: int = 90) -> dict[str, Any]:
    """Every parameter of vLLM's model for ``folder`` as its own loaders fill it (one load; no checks): for
    comparing what vLLM makes of two checkpoints of the same model."""
    bootstrap()
    set_capability(capability)
    import torch
    from vllm.config import DeviceConfig, LoadConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    mc = model_config(folder, max_model_len=None)
    vc = VllmConfig(model_config=mc, device_config=DeviceConfig(device="cpu"), load_config=LoadConfig())
    _init_distributed(vc)
    with set_current_vllm_config(vc), set_default_torch_dtype(torch.bfloat16), torch.device("cpu"):
        model = initialize_model(vllm_config=vc)
    with set_current_vllm_config(vc):
        model.load_weights(DefaultModelLoader(vc.load_config).get_all_weights(mc, model))
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def markdown(results: list[Result]) -> str:
    lines = ["| engine | version | kind | family | layer kind | capability | pick | loaded |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for layer, pick in sorted(r.picks.items()) or [("-", "-")]:
            lines.append(f"| {r.engine} | {r.version} | {r.kind} | {r.family} | {layer} | sm{r.capability} | "
                         f"{pick} | {'yes' if r.loaded else 'no'} |")
    return "\n".join(lines) + "\n"


def write_report(results: list[Result], name: str, title: str) -> None:
    """Print the results table and write it (JSON for tests/engines/summarize.py, and markdown) under
    ``$QCONVERT_ENGINES_REPORT`` (default build/engines) as ``NAME.json`` / ``NAME.md``."""
    if not results:
        return
    import json

    table = markdown(results)
    print(f"\n\nvLLM {VERSION} {title}\n\n{table}")
    target = Path(os.environ.get("QCONVERT_ENGINES_REPORT", "build/engines"))
    target.mkdir(parents=True, exist_ok=True)
    (target / f"{name}.json").write_text(json.dumps([r.to_json() for r in results], indent=1) + "\n")
    (target / f"{name}.md").write_text(table)
