"""``--device`` and ``--workers``: the execution engine writes the same bytes on every device, with any
number of I/O threads and any in-flight budget; bad values are refused in one line.

The GPU tests (marked ``gpu``, run on the device machine) convert real multi-shard checkpoints with every
scheme, the FP8 inputs and every ``convert`` op on the CPU and on CUDA and compare the files byte for byte.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from qconvert.engine import MAX_WORKERS, default_workers, execution_settings
from qconvert.errors import BadInputError
from qconvert.format import compress_weight
from qconvert.pipeline import ConvertRequest, QuantizeRequest, convert, quantize
from qconvert.quantizers import scales_from_amax
from qconvert.schemes import SCHEMES, get_scheme
from tests.conftest import build_deepseek_fp8, build_tiny_llama, read_tensors, run_cli, run_python, tree_digest
from tests.test_convert import _with_static_scales

ALL_SCHEMES = sorted(SCHEMES)
SILENT = {"show_progress": False}


def _quantize(model: Path, out: Path, scheme: str, device: str, workers: int | None = None, **extra: object) -> Path:
    request = QuantizeRequest(model=str(model), scheme=get_scheme(scheme), output=out, device=device,
                              workers=workers, max_shard_bytes=300_000, **SILENT, **extra)  # type: ignore[arg-type]
    quantize(request, lambda _: None)
    return out


def _convert(model: Path, out: Path, op: str, device: str, **extra: object) -> Path:
    request = ConvertRequest(model=str(model), op=op, output=out, device=device, max_shard_bytes=300_000,
                             **SILENT, **extra)  # type: ignore[arg-type]
    convert(request, lambda _: None)
    return out


def _assert_same_files(a: Path, b: Path) -> None:
    left, right = tree_digest(a), tree_digest(b)
    assert left.keys() == right.keys()
    differing = [name for name in left if left[name] != right[name]]
    assert not differing, f"files differ: {differing}"
    assert len([n for n in left if n.endswith(".safetensors")]) > 1  # really multi-shard


# -- CPU: every machine ---------------------------------------------------------------------------


def test_settings_defaults_and_validation() -> None:
    settings = execution_settings("cpu", None)
    assert settings.device == torch.device("cpu")
    assert settings.workers == default_workers()
    assert 2 <= default_workers() <= 8
    assert settings.budget_bytes == 64 * settings.workers << 20
    auto = execution_settings("auto", 3)
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    for workers in (0, -1, MAX_WORKERS + 1):
        with pytest.raises(BadInputError, match="--workers"):
            execution_settings("cpu", workers)
    for device in ("tpu", "cuda:x", "gpu", ""):
        if device == "":
            assert execution_settings(device).device.type in ("cpu", "cuda")  # empty means auto
            continue
        with pytest.raises(BadInputError, match="--device"):
            execution_settings(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_refused_without_gpu(tiny_llama: Path, tmp_path: Path) -> None:
    result = run_cli("quantize", tiny_llama, "-o", tmp_path / "out", "--device", "cuda")
    assert result.code == 2
    assert result.stderr_lines == ["error: --device cuda: no CUDA GPU is visible to torch"] or (
        len(result.stderr_lines) == 1 and "no CUDA GPU" in result.stderr_lines[0])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["--workers", "0"], ["--workers", "1000"], ["--device", "tpu"]])
def test_bad_values_exit_2_in_one_line(tiny_llama: Path, tmp_path: Path, args: list[str]) -> None:
    for command in (["quantize", tiny_llama], ["convert", tiny_llama, "--op", "pack"]):
        result = run_cli(*command, "-o", tmp_path / "out", *args)
        assert result.code == 2, result.stderr
        assert len(result.stderr_lines) == 1 and args[0] in result.stderr_lines[0], result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists()


def test_scale_division_by_tensor_matches_scalar_on_cpu() -> None:
    """The divisor became a tensor (CUDA divides by a Python scalar via its reciprocal); on the CPU
    the result must be the same division as before, for every divisor a scheme uses."""
    gen = torch.Generator().manual_seed(1)
    amax = torch.cat([torch.rand(1 << 20, generator=gen) * 10.0 ** e for e in range(-6, 4)])
    for divisor in (7.5, 127.5, 448.0):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            expected = (amax / divisor).to(dtype)
            expected = expected.masked_fill_(expected == 0, torch.finfo(dtype).eps)
            assert torch.equal(scales_from_amax(amax, divisor, dtype), expected)


@pytest.fixture(scope="module")
def two_shard_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("dev") / "llama", max_shard_size="300KB", seed=3)


@pytest.mark.parametrize("scheme", ["rtn4", "fp8-block", "fp8-tensor"])
def test_cpu_auto_and_any_workers_write_identical_bytes(two_shard_llama: Path, tmp_path: Path, scheme: str) -> None:
    """--device cpu / auto (on a machine without a GPU), 1 or 6 workers, a 1 MiB budget (every unit
    larger than the budget runs alone): the same files, holding what the quantizer computes directly."""
    base = _quantize(two_shard_llama, tmp_path / "cpu1", scheme, "cpu", workers=1)
    variants = [_quantize(two_shard_llama, tmp_path / "cpu6", scheme, "cpu", workers=6)]
    if not torch.cuda.is_available():
        variants.append(_quantize(two_shard_llama, tmp_path / "auto", scheme, "auto"))
    os.environ["QCONVERT_INFLIGHT_MB"] = "1"
    try:
        variants.append(_quantize(two_shard_llama, tmp_path / "tight", scheme, "cpu", workers=3))
    finally:
        del os.environ["QCONVERT_INFLIGHT_MB"]
    for variant in variants:
        _assert_same_files(base, variant)
    written = read_tensors(base)
    source = read_tensors(two_shard_llama)
    name = "model.layers.1.mlp.down_proj.weight"
    if scheme != "fp8-tensor":  # fp8-tensor's fused parts share a scale; down_proj is not fused
        direct = compress_weight(name, source[name], get_scheme(scheme))
        for key, tensor in direct.items():
            assert torch.equal(written[key], tensor), key


def test_cli_device_cpu_matches_default(tiny_llama: Path, tmp_path: Path) -> None:
    first = run_cli("quantize", tiny_llama, "-o", tmp_path / "a", "--device", "cpu", "--workers", "2", "-q",
                    "--max-shard-size", "300KB")
    second = run_cli("quantize", tiny_llama, "-o", tmp_path / "b", "-q", "--max-shard-size", "300KB")
    assert first.code == 0 and second.code == 0, first.stderr + second.stderr
    if not torch.cuda.is_available():
        _assert_same_files(tmp_path / "a", tmp_path / "b")


def test_write_error_surfaces_and_leaves_no_output(two_shard_llama: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from qconvert import safetensors_io

    calls = {"n": 0}
    original = safetensors_io.ShardFile.write

    def failing(self: safetensors_io.ShardFile, name: str, tensor: torch.Tensor, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        original(self, name, tensor, **kwargs)

    monkeypatch.setattr(safetensors_io.ShardFile, "write", failing)
    from qconvert.errors import QConvertError

    # A full disk is reported as one line naming the output (issue 12), whichever writer thread hit it.
    with pytest.raises(QConvertError, match=r"disk filled up.*No space"):
        _quantize(two_shard_llama, tmp_path / "out", "rtn4", "cpu", workers=4)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.qconvert-*"))


# -- GPU: byte identity of the CUDA path ----------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A multi-shard bf16 Llama, its DeepSeek-style FP8 form, and quantized inputs for every convert op
    (made on the CPU)."""
    root = tmp_path_factory.mktemp("gpu")
    llama = build_tiny_llama(root / "llama", max_shard_size="300KB", seed=7)
    inputs = {"llama": llama, "deepseek": build_deepseek_fp8(llama, root / "deepseek")}
    inputs["fp8"] = _quantize(llama, root / "fp8", "fp8", "cpu")  # fnuz
    # per-tensor fp8 with no shared scales (no fused pattern matches), for shared-scale
    inputs["fp8-tensor-unshared"] = _quantize(llama, root / "fp8t", "fp8-tensor", "cpu",
                                              fused_patterns=[r"^(nothing)$"])
    inputs["int8"] = _quantize(llama, root / "int8", "w8a8-int8", "cpu")  # pack
    # pack refuses dynamic activations (issue 10): give the layers static scales, as a calibrated wNa8o8 has
    _with_static_scales(inputs["int8"], "int", "model.layers.1.self_attn.k_proj")
    inputs["rtn4"] = _quantize(llama, root / "rtn4", "rtn4", "cpu")  # dequantize
    return inputs


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU results written in pieces of 4099 bytes (8 MiB in real runs): with the tiny models' tensors,
    most are cut into several pieces, at offsets that fall inside elements."""
    from qconvert import engine

    monkeypatch.setattr(engine, "_WRITE_PIECE", 4099)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ALL_SCHEMES)
@pytest.mark.parametrize("pieces", ["whole", "small"])
def test_every_scheme_byte_identical_on_cuda(gpu_inputs: dict[str, Path], tmp_path: Path, scheme: str, pieces: str,
                                             request: pytest.FixtureRequest) -> None:
    if pieces == "small":
        request.getfixturevalue("small_pieces")
    cpu = _quantize(gpu_inputs["llama"], tmp_path / "cpu", scheme, "cpu")
    cuda = _quantize(gpu_inputs["llama"], tmp_path / "cuda", scheme, "cuda", workers=4)
    _assert_same_files(cpu, cuda)


@pytest.mark.gpu
def test_failed_piece_write_on_cuda_surfaces_and_leaves_no_output(gpu_inputs: dict[str, Path], tmp_path: Path,
                                                                   small_pieces: None,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that fills up while one piece of a GPU result is being written: one line naming the
    output, every thread stopped, nothing left behind (the other pieces' regions are given back)."""
    from qconvert import safetensors_io
    from qconvert.errors import QConvertError

    calls = {"n": 0}
    original = safetensors_io.ShardFile.write_range

    def failing(self: safetensors_io.ShardFile, name: str, data: memoryview, start: int) -> None:
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError(28, "No space left on device")
        original(self, name, data, start)

    monkeypatch.setattr(safetensors_io.ShardFile, "write_range", failing)
    with pytest.raises(QConvertError, match=r"disk filled up.*No space"):
        _quantize(gpu_inputs["llama"], tmp_path / "out", "fp8-block", "cuda", workers=4)
    assert calls["n"] >= 7
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.qconvert-*"))


@pytest.mark.gpu
# The FP8 input is a Llama in DeepSeek's FP8 form: --layout sglang is refused for Llama without --force-layout.
@pytest.mark.parametrize(("scheme", "extra"), [("int8-block", {}),
                                               ("int8-block", {"layout": "sglang", "force_layout": True}),
                                               ("rtn4", {}), ("fp8-tensor", {}), ("fp8-block", {"fnuz": True})])
def test_fp8_inputs_byte_identical_on_cuda(gpu_inputs: dict[str, Path], tmp_path: Path, scheme: str,
                                           extra: dict) -> None:
    cpu = _quantize(gpu_inputs["deepseek"], tmp_path / "cpu", scheme, "cpu", **extra)
    cuda = _quantize(gpu_inputs["deepseek"], tmp_path / "cuda", scheme, "cuda:0", **extra)
    _assert_same_files(cpu, cuda)


@pytest.mark.gpu
@pytest.mark.parametrize(("op", "source", "extra"), [
    ("fnuz", "fp8", {}), ("shared-scale", "fp8-tensor-unshared", {}), ("pack", "int8", {}),
    ("dequantize", "rtn4", {}), ("dequantize", "deepseek", {"dtype": torch.float32}),
])
def test_every_convert_op_byte_identical_on_cuda(gpu_inputs: dict[str, Path], tmp_path: Path, op: str, source: str,
                                                 extra: dict) -> None:
    cpu = _convert(gpu_inputs[source], tmp_path / "cpu", op, "cpu", **extra)
    cuda = _convert(gpu_inputs[source], tmp_path / "cuda", op, "cuda", **extra)
    _assert_same_files(cpu, cuda)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_large_weights_byte_identical_on_cuda(scheme: str) -> None:
    """Llama-8B-sized weights (GPU bands of 16M elements cover several CPU bands), values spread over
    many magnitudes with exact ties and zero tiles, for every scheme: CPU and CUDA give the same tensors."""
    gen = torch.Generator().manual_seed(11)
    for shape in ((14336, 4096), (1024, 4096), (4096, 14336 + 64)):
        weight = torch.randn(shape, generator=gen) * torch.logspace(-4, 1, shape[1])
        weight[:128, :128] = 0  # a zero tile gets eps, not NaN
        weight[200, :16] = torch.tensor([0.5, 1.5, 2.5, -2.5, 3.5, 7.0, -7.5, 448.0] * 2)
        weight = weight.to(torch.bfloat16)
        s = get_scheme(scheme)
        if s.strategy == "group" and shape[1] % (s.group_size or 1):
            continue
        scale = torch.tensor(0.0371, dtype=torch.bfloat16).reshape(1, 1) if scheme == "fp8-tensor" else None
        on_cpu = compress_weight("w.weight", weight, s, shared=scale)
        on_gpu = compress_weight("w.weight", weight.cuda(), s, shared=scale)
        for key, tensor in on_cpu.items():
            other = on_gpu[key].cpu()
            assert other.dtype == tensor.dtype and torch.equal(_bytes(other), _bytes(tensor)), (key, shape)


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.gpu
def test_cli_device_cuda(tiny_llama: Path, tmp_path: Path) -> None:
    for device in ("cpu", "cuda", "auto"):
        result = run_cli("quantize", tiny_llama, "-s", "fp8-block", "-o", tmp_path / device, "--device", device, "-q",
                         "--max-shard-size", "300KB")
        assert result.code == 0, result.stderr
    _assert_same_files(tmp_path / "cpu", tmp_path / "cuda")
    _assert_same_files(tmp_path / "cpu", tmp_path / "auto")
    shutil.rmtree(tmp_path / "auto")


@pytest.mark.gpu
@pytest.mark.parametrize("arena_mib", ["1", "2"])
def test_tiny_arena_on_cuda(gpu_inputs: dict[str, Path], tmp_path: Path, arena_mib: str, small_pieces: None,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A page-locked arena smaller than most units (1 MiB: every unit runs alone through ordinary
    memory; 2 MiB: a mix of arena regions and such units) still writes the CPU path's bytes."""
    cpu = _quantize(gpu_inputs["llama"], tmp_path / "cpu", "fp8-block", "cpu")
    monkeypatch.setenv("QCONVERT_INFLIGHT_MB", arena_mib)
    cuda = _quantize(gpu_inputs["llama"], tmp_path / "cuda", "fp8-block", "cuda", workers=3)
    _assert_same_files(cpu, cuda)


# -- the CUDA context started while the command imports (qconvert.early_cuda) ---------------------


@pytest.mark.parametrize(("args", "expected"), [
    (["quantize", "m"], 0),
    (["quantize", "m", "--device", "cuda"], 0),
    (["convert", "m", "--device=cuda:2"], 2),
    (["batch", "jobs.yaml"], 0),
    (["batch", "jobs.yaml", "--ray", "local"], None),
    (["quantize", "m", "--device", "cpu"], None),
    (["quantize", "m", "--device=CPU"], None),
    (["quantize", "m", "--dry-run"], None),
    (["quantize", "--help"], None),
    (["inspect", "m"], None),
    (["verify", "m"], None),
    ([], None),
])
def test_early_cuda_only_for_commands_that_use_a_gpu(args: list[str], expected: int | None) -> None:
    from qconvert import early_cuda

    assert early_cuda.gpu_ordinal(args) == expected


def test_early_cuda_is_harmless_without_a_driver_or_when_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from qconvert import early_cuda

    thread = early_cuda.start(["quantize", "m"])
    if thread is not None:
        thread.join(timeout=60)
        assert not thread.is_alive()
    monkeypatch.setenv("QCONVERT_EARLY_CUDA", "0")
    assert early_cuda.start(["quantize", "m"]) is None


@pytest.mark.gpu
def test_early_cuda_context_is_the_one_torch_uses(tiny_llama: Path, tmp_path: Path) -> None:
    """In a fresh process: the primary context retained through the driver before torch is imported
    is the context torch's runtime then works in, and the command's output is the same bytes."""
    code = ("import ctypes, sys; sys.argv = ['qconvert', 'quantize', 'm']\n"
            "from qconvert import early_cuda\n"
            "early_cuda.start(['quantize', 'm']).join()\n"
            "import torch\n"
            "torch.empty(1, device='cuda')\n"
            "driver = ctypes.CDLL('libcuda.so.1')\n"
            "current, primary = ctypes.c_void_p(), ctypes.c_void_p()\n"
            "assert driver.cuCtxGetCurrent(ctypes.byref(current)) == 0\n"
            "device = ctypes.c_int(); driver.cuDeviceGet(ctypes.byref(device), 0)\n"
            "assert driver.cuDevicePrimaryCtxRetain(ctypes.byref(primary), device) == 0\n"
            "print(current.value == primary.value and current.value is not None)\n")
    done = run_python("-c", code)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
    args = ("-s", "fp8-block", "--device", "cuda", "-q", "--max-shard-size", "300KB")
    on = run_cli("quantize", tiny_llama, "-o", tmp_path / "on", *args, process=True)
    off = run_cli("quantize", tiny_llama, "-o", tmp_path / "off", *args, process=True,
                  env={"QCONVERT_EARLY_CUDA": "0"})
    assert on.code == 0 and off.code == 0, on.stderr + off.stderr
    _assert_same_files(tmp_path / "on", tmp_path / "off")


def test_malloc_policy_engine_then_batch_and_never_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU engine run fixes glibc's mmap threshold; a batch run then keeps its buffers in the arenas;
    a later engine run leaves batch's policy as it is (the calls reach mallopt as written)."""
    import ctypes
    import sys
    import types

    from qconvert import malloc_policy

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt: Linux only")
    calls: list[tuple[int, int]] = []

    class FakeMallopt:
        def __init__(self) -> None:
            self.argtypes: list = []
            self.restype = None

        def __call__(self, parameter: int, value: int) -> int:
            calls.append((parameter, value))
            return 1

    fake_libc = types.SimpleNamespace(mallopt=FakeMallopt())
    monkeypatch.setattr(malloc_policy, "ctypes", types.SimpleNamespace(CDLL=lambda _name: fake_libc,
                                                                       c_int=ctypes.c_int))
    monkeypatch.setattr(malloc_policy, "_chosen", None)
    malloc_policy.for_engine_on_cpu()
    malloc_policy.for_engine_on_cpu()  # once
    assert calls == [(-3, 32 << 20)] and malloc_policy.chosen() == "engine"
    malloc_policy.for_batch()
    assert calls[1:] == [(-3, 32 << 20), (-1, 128 << 20)] and malloc_policy.chosen() == "batch"
    malloc_policy.for_engine_on_cpu()
    assert len(calls) == 3 and malloc_policy.chosen() == "batch"
