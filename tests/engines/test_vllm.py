"""vLLM conformance tier: every output kind qconvert writes, through the released vLLM's own code.

For each case (scheme, layout, ``convert`` op, mixed config) on a tiny Llama-shaped and a tiny DeepSeek-V3-shaped
checkpoint (MLA, MoE experts with shared experts, first layer dense), at GPU capability 75, 80, 89 and 90:
vLLM parses the config and builds its real model class (``LlamaForCausalLM`` / ``DeepseekV3ForCausalLM``), so its
``CompressedTensorsConfig.get_quant_method`` picks a scheme per layer; every tensor goes through the model's own
``load_weights`` and the loader's ``track_weights_loading``; every parameter must have been written (two loads over
two byte sentinels) and equal the checkpoint's tensors (see ``vllm_harness``). The test then asserts that vLLM
loads the case at a capability exactly when ``qconvert.serving`` says so, and picks the table's method.

Stubbed (see ``vllm_harness`` for the details): vLLM runs on its CPU platform with the capability query patched,
and kernel selection falls back to the platform's kernels that can implement the layer (ignoring this CPU's lack
of AMX), to Marlin / Triton for WNA16 / int8 / NVFP4 / MXFP8 MoE experts, or to a never-run stand-in, because no kernel
runs here. Post-load processing runs only for NVFP4 / MXFP4 / MXFP8 layers, up to the GPU kernel's repacking (the
weights vLLM then computes with must equal the checkpoint's; ``vllm_harness.check_postload``).

Run in the vLLM venv: ``make engines`` (``tests/engines/setup_vllm.sh``); skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.engines import vllm_harness as harness

_REASON = harness.unavailable_reason()
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)

# vLLM caches what it learns by importing each model class in a subprocess (~30 s per architecture): keep that
# cache beside the venv, so a warm CI reuses it.
os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(sys.prefix) / "vllm-cache"))

from qconvert import serving  # noqa: E402
from qconvert.cli import main as qconvert_main  # noqa: E402
from tests.engines.sources import build_vllm_source  # noqa: E402

FAMILIES = ("llama", "deepseek")


@dataclass(frozen=True)
class Case:
    name: str  # the id, and the output kind of qconvert.serving for uniform cases
    scheme: str
    quantize: tuple[str, ...] = ()  # extra `quantize` arguments
    op: str | None = None  # `convert --op`
    overrides: tuple[tuple[str, str], ...] = ()  # (layer-kind prefix, scheme or "none") the --override gives
    families: tuple[str, ...] = FAMILIES

    def scheme_of(self, layer_kind: str) -> str:
        """The scheme (serving kind) a layer of this kind has in the checkpoint."""
        for prefix, scheme in self.overrides:
            if layer_kind in prefix.split("|"):
                return scheme
        return self.name if not self.overrides else self.scheme


MLP_KINDS = "gate_up_proj|down_proj|experts"
CASES = [
    *(Case(s, s) for s in ("rtn4", "rtn8", "int8-block", "w8a8-int8", "fp8", "fp8-block", "fp8-tensor")),
    # Microscaled, weight-only (llm-compressor's NVFP4A16 / MXFP4A16 / MXFP8A16): besides the loading checks, the
    # weights vLLM computes with after its own post-load processing (NVFP4: one global scale per fused layer and
    # per expert's gate/up) must equal the checkpoint's (vllm_harness.check_postload).
    *(Case(s, s) for s in ("nvfp4", "mxfp4", "mxfp8")),
    # Zero points (llm-compressor's W4A16_ASYM / W8A16_ASYM): vLLM registers weight_zero_point (dense) and
    # w13/w2_weight_zero_point (experts), compared with the checkpoint's like every other parameter.
    *(Case(s, s) for s in ("int4-asym", "int8-asym")),
    Case("int8-block@sglang", "int8-block", ("--layout", "sglang", "--force-layout")),
    Case("w8a8-int8+pack", "w8a8-int8", op="pack"),
    Case("int8-block+pack", "int8-block", op="pack"),
    Case("fp8+fnuz", "fp8", op="fnuz"),
    Case("fp8-block+fnuz", "fp8-block", op="fnuz"),
    Case("fp8-tensor+fnuz", "fp8-tensor", op="fnuz"),
    # (from scales that are not shared yet: on qconvert's own fp8-tensor output, which shares them, the op is a no-op
    # that writes nothing)
    Case("fp8-tensor+shared-scale", "fp8-tensor", ("--fuse", "^(NOMATCH)$"), op="shared-scale"),
    Case("fp8-block+dequantize", "fp8-block", op="dequantize"),
    Case("mixed:fp8-block,mlp=rtn4", "fp8-block", ("--override", "re:.*mlp.*=rtn4"),
         overrides=((MLP_KINDS, "rtn4"),)),
    Case("mixed:fp8-block,o_proj=none", "fp8-block", ("--override", "re:.*self_attn.o_proj=none"),
         overrides=(("o_proj", "none"),)),
]
RESULTS: list[harness.Result] = []


def _qconvert(*args: str | Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            qconvert_main([str(a) for a in args])
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    return code, err.getvalue().strip()


class Checkpoints:
    """Each source model and each case's checkpoint built once per module (and vLLM's ModelConfig for it)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[tuple[str, str], tuple[Path | None, str]] = {}
        self.configs: dict[Path, object] = {}

    def source(self, family: str) -> Path:
        folder = self.root / f"src-{family}"
        return folder if folder.exists() else build_vllm_source(family, folder)

    def get(self, case: Case, family: str) -> tuple[Path | None, str]:
        """The checkpoint folder, or None and qconvert's refusal."""
        key = (case.name, family)
        if key not in self.built:
            out = self.root / f"{case.name.replace(':', '_').replace('=', '-').replace(',', '_')}-{family}"
            quantized = out.with_name(out.name + "-q") if case.op else out
            code, err = _qconvert("quantize", self.source(family), "-s", case.scheme, *case.quantize, "-q",
                                  "-o", quantized)
            if code == 0 and case.op:
                code, err = _qconvert("convert", quantized, "--op", case.op, "-q", "-o", out)
            self.built[key] = (out if code == 0 else None, err if code else "")
            if code not in (0, 2):
                raise AssertionError(f"qconvert crashed on {case.name} ({family}): {err}")
        return self.built[key]

    def model_config(self, folder: Path) -> object:
        if folder not in self.configs:
            try:
                self.configs[folder] = harness.model_config(folder)
            except Exception as error:  # vLLM's refusal to parse the config is an observation
                self.configs[folder] = error
        return self.configs[folder]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("vllm-engines"))


@pytest.fixture(scope="module", autouse=True)
def report() -> object:
    yield
    harness.write_report(RESULTS, "vllm", "conformance results")


def _expected_pick(case: Case, layer_kind: str, family: str, capability: int) -> tuple[str | None, bool]:
    """(the method the table says vLLM picks for this layer, whether the table has vLLM serving it here)."""
    kind = case.scheme_of(layer_kind)
    if kind == "none" or case.op == "dequantize":
        # A dequantized output has no quantization_config: a plain checkpoint, which the table does not list.
        return ("UnquantizedFusedMoEMethod" if layer_kind == "experts" else "UnquantizedLinearMethod"), True
    entry = serving.pick(kind, serving.Engine.VLLM, capability, family)
    if entry is None:
        return None, False
    return (entry.moe_method if layer_kind == "experts" else entry.method), True


PARAMS = [pytest.param(case, family, capability, id=f"{case.name}-{family}-sm{capability}")
          for case in CASES for family in case.families for capability in harness.CAPABILITIES]


@pytest.mark.parametrize(("case", "family", "capability"), PARAMS)
def test_vllm_loads_what_the_table_says(checkpoints: Checkpoints, case: Case, family: str, capability: int) -> None:
    folder, refusal = checkpoints.get(case, family)
    if folder is None:
        # qconvert refuses to write it (exit 2, one line): then the table must not claim that vLLM serves it.
        result = harness.Result(harness.ENGINE, harness.VERSION, family, case.name, capability,
                                problems=[f"qconvert refuses: {refusal}"])
        RESULTS.append(result)
        assert len(refusal.splitlines()) == 1 and refusal, refusal
        assert not [s for s in serving.serving_for(case.name, family) if s.engine == serving.Engine.VLLM]
        return
    config = checkpoints.model_config(folder)
    if isinstance(config, Exception):
        result = harness.Result(harness.ENGINE, harness.VERSION, family, case.name, capability,
                                problems=[harness._one_line(config)])
    else:
        result = harness.run_case(folder, family, case.name, capability, config)
    RESULTS.append(result)

    kinds = {k for k in result.picks if k != "gate"} or {"qkv_proj"}
    served = all(_expected_pick(case, k, family, capability)[1] for k in kinds)
    assert result.loaded == served, (
        f"vLLM {'loads' if result.loaded else 'does not load'} {case.name} ({family}) at sm{capability}, the table "
        f"says it {'does' if served else 'does not'}: {result.problems[:3]}")
    if not result.loaded:
        return
    wrong = {}
    for layer, pick in result.picks.items():
        # "gate" is the MoE router, which qconvert leaves unquantized
        want = "UnquantizedLinearMethod" if layer == "gate" else _expected_pick(case, layer, family, capability)[0]
        if pick != want:
            wrong[layer] = f"{pick} (table: {want})"
    assert not wrong, f"{case.name} ({family}) sm{capability}: {wrong}"


# What vLLM's own chooser picks on a CUDA GPU for the zero-point schemes (vllm_harness._on_gpu_first): the kernels
# qconvert.serving's notes name. Llama's layers all suit Machete (in % 64 == 0, out % 128 == 0); DeepSeek's fused
# q_a/kv_a layer (128 + 128 + 64 = 320 outputs) does not, and gets Humming, which vLLM ranks above Marlin at sm90.
GPU_KERNELS = {
    ("int4-asym", "llama", 80): {"qkv_proj": "MarlinLinearKernel", "down_proj": "MarlinLinearKernel"},
    ("int4-asym", "llama", 90): {"qkv_proj": "MacheteLinearKernel", "down_proj": "MacheteLinearKernel"},
    ("int4-asym", "deepseek", 90): {"fused_qkv_a_proj": "HummingLinearKernel", "o_proj": "MacheteLinearKernel",
                                    "experts": "MARLIN (MarlinExperts)"},
    ("int8-asym", "llama", 80): {"qkv_proj": "HummingLinearKernel", "down_proj": "HummingLinearKernel"},
    ("int8-asym", "llama", 90): {"qkv_proj": "MacheteLinearKernel", "down_proj": "MacheteLinearKernel"},
}


@pytest.mark.parametrize(("kind", "family", "capability"), list(GPU_KERNELS))
def test_vllm_gpu_kernels_for_zero_points(checkpoints: Checkpoints, kind: str, family: str, capability: int) -> None:
    """The kernels vLLM's chooser picks on a GPU of that capability (the chooser is vLLM's; only the platform it
    reads is CUDA, and Humming counts as installed, as in vLLM's CUDA wheel), and the zero points loaded."""
    folder, refusal = checkpoints.get(next(c for c in CASES if c.name == kind), family)
    assert folder is not None, refusal
    result = harness.run_case(folder, family, kind, capability, checkpoints.model_config(folder))
    assert result.loaded, result.problems
    got = {layer: result.gpu_kernels.get(layer) for layer in GPU_KERNELS[(kind, family, capability)]}
    assert got == GPU_KERNELS[(kind, family, capability)], result.gpu_kernels
    # the zero points are vLLM parameters, compared with the checkpoint's like the rest (none left over)
    assert any(name.endswith("weight_zero_point") for name in harness.loaded_parameters(folder, capability))


@pytest.mark.parametrize("damage", ["drop", "rename", "widen"])
def test_the_harness_sees_a_damaged_checkpoint(checkpoints: Checkpoints, tmp_path: Path, damage: str) -> None:
    """The loading checks can fail: a tensor left out, renamed to a name vLLM does not know, or stored in a wider
    dtype than vLLM's parameter (its copy rounds the values) is each reported (by vLLM's own loader, the
    never-written check or the comparison with the checkpoint)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder, _ = checkpoints.get(CASES[0], "llama")  # rtn4
    assert folder is not None
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shard = next(broken.glob("*.safetensors"))
    tensors = load_file(shard)
    name = "model.layers.1.self_attn.o_proj.weight_scale"
    if damage == "drop":
        del tensors[name]
    elif damage == "rename":
        tensors[name.replace("weight_scale", "weight_scale_inv")] = tensors.pop(name)
    else:  # float32 scales that bfloat16 cannot hold
        tensors[name] = tensors[name].float() * (1 + 2**-12)
    save_file(tensors, shard, metadata={"format": "pt"})
    result = harness.run_case(broken, "llama", "rtn4", 90, harness.model_config(broken))
    assert not result.loaded
    assert any("o_proj" in problem for problem in result.problems), result.problems


def test_the_postload_check_sees_unshared_nvfp4_global_scales(checkpoints: Checkpoints, tmp_path: Path) -> None:
    """What qconvert's shared NVFP4 global scales are for: with one k_proj's global scale halved (its codes and e4m3
    scales kept, so the checkpoint still decodes to a valid weight), vLLM loads it without a word, but computes
    that k_proj with the largest of q/k/v's global scales: the post-load comparison reports the fused layer."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder, refusal = checkpoints.get(next(c for c in CASES if c.name == "nvfp4"), "llama")
    if folder is None:
        pytest.skip(f"qconvert does not write nvfp4 here: {refusal}")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    name = "model.layers.1.self_attn.k_proj.weight_global_scale"
    shard = next(s for s in broken.glob("*.safetensors") if name in load_file(s))
    tensors = load_file(shard)
    tensors[name] = tensors[name] / 2
    save_file(tensors, shard, metadata={"format": "pt"})
    result = harness.run_case(broken, "llama", "nvfp4", 90, harness.model_config(broken))
    assert not result.loaded
    assert [p for p in result.problems if p.startswith("model.layers.1.self_attn.qkv_proj: after vLLM's")] \
        == result.problems, result.problems


def test_the_harness_sees_a_missing_zero_point(checkpoints: Checkpoints, tmp_path: Path) -> None:
    """vLLM registers weight_zero_point for int4-asym layers: one left out of the checkpoint is reported (vLLM's
    parameter is never written), so the zero points compared in the conformance cases are the checkpoint's."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder, refusal = checkpoints.get(next(c for c in CASES if c.name == "int4-asym"), "llama")
    assert folder is not None, refusal
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shard = next(broken.glob("*.safetensors"))
    tensors = load_file(shard)
    del tensors["model.layers.1.self_attn.o_proj.weight_zero_point"]
    save_file(tensors, shard, metadata={"format": "pt"})
    result = harness.run_case(broken, "llama", "int4-asym", 80, harness.model_config(broken))
    assert not result.loaded
    assert any("o_proj.weight_zero_point" in problem for problem in result.problems), result.problems
