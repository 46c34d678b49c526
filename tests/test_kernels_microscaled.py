"""The microscaled weight-only GEMM (NVFP4, MXFP4, MXFP8) against its pure-torch reference.

Two kinds of checks: the dequantized operand the kernel feeds its dot equals the reference weight bit for bit
(observed through an identity X, whose product holds each weight element alone), and the GEMM's output lies
within the bound of float32 accumulation order of the float64 product with the reference weight. Corrupting one
stored code, one block scale or the global scale must then take the output outside that bound, where the
corruption lies. Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py selects it before
Triton is imported) on small shapes; the GPU tests run production shapes.
"""

from __future__ import annotations

import pytest
import torch

from qconvert.formats.args import ScaleDtype
from qconvert.kernels.configs import TileConfig
from qconvert.kernels.microscaled import MXFP4, MXFP8, NVFP4, MicroFormat, dequantize, microscaled_gemm
from qconvert.kernels.microscaled_reference import (
    E2M1_VALUES,
    dequantize_nvfp4,
    e8m0_to_float,
    pack_e2m1,
    unpack_e2m1,
)
from tests.conftest import DEVICE, poison_device_memory

GPU = DEVICE.type == "cuda"
U32 = 2.0**-24
FMTS = [NVFP4, MXFP4, MXFP8]
DTYPES = [torch.bfloat16, torch.float16]
E4M3_NAN = 0x7F


def ids(value: object) -> str | None:
    if isinstance(value, MicroFormat):
        return value.name
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return None


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_e4m3_bytes(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Uniform e4m3fn bit patterns, NaN (0x7F, 0xFF) excepted: every finite value, subnormals and -0 included."""
    b = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator(seed))
    return torch.where((b & 0x7F) == E4M3_NAN, b ^ 1, b)


def make_weight(fmt: MicroFormat, n: int, k: int, seed: int = 0, exponents: tuple[int, int] = (120, 130),
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(weight, scales, global scale)`` as compressed-tensors stores them: random codes (every byte value /
    every finite e4m3 value among them) and random scales (e4m3 between 2**-4 and 8, E8M0 exponents in
    ``exponents``)."""
    if fmt.per_byte == 2:
        weight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=generator(seed))
        every = torch.arange(256)
    else:
        weight = random_e4m3_bytes((n, k), seed)
        every = torch.tensor([b for b in range(256) if b & 0x7F != E4M3_NAN])
    # Every byte value somewhere (where the weight is large enough), in a random order.
    count = min(len(every), weight.numel())
    weight.view(-1)[:count] = every[torch.randperm(len(every), generator=generator(seed))[:count]].to(torch.uint8)
    if fmt.per_byte == 1:
        weight = weight.view(torch.float8_e4m3fn)
    groups = k // fmt.group
    if fmt.scale is ScaleDtype.E4M3:
        log2 = torch.rand((n, groups), generator=generator(seed + 1)) * 7 - 4
        scales = torch.exp2(log2).to(torch.float8_e4m3fn)
        # Not a power of two, so the division by it rounds (as amax-derived global scales do).
        global_scale = torch.tensor([448.0 * 6.0 / 17.3])
    else:
        lo, hi = exponents
        scales = torch.randint(lo, hi + 1, (n, groups), dtype=torch.uint8, generator=generator(seed + 1))
        global_scale = None
    return weight.to(DEVICE), scales.to(DEVICE), global_scale.to(DEVICE) if global_scale is not None else None


def reference(fmt: MicroFormat, weight: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor | None,
              dtype: torch.dtype) -> torch.Tensor:
    """The reference weight, dequantized on the CPU (torch on CUDA may divide by a one-element tensor as a
    multiplication by its reciprocal, which is not compressed-tensors' arithmetic)."""
    gs = global_scale.cpu() if global_scale is not None else None
    return dequantize(fmt, weight.cpu(), scales.cpu(), gs, dtype)


def randn(*shape: int, dtype: torch.dtype = torch.bfloat16, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    return (torch.randn(shape, generator=generator(seed)) * scale).to(dtype).to(DEVICE)


def excess(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``|out - x @ weight^T - bias|`` in units of the bound for float32 accumulation in any order (K roundings of
    relative size 2**-24 each, on the sum of absolute products; plus the output's own rounding when it is
    narrower than float32). At most 1 for a correct kernel."""
    k = x.shape[-1]
    a, b = x.double(), weight.to(x.device).double()
    ref = a @ b.T
    abs_dot = a.abs() @ b.abs().T
    if bias is not None:
        ref = ref + bias.double()
        abs_dot = abs_dot + bias.double().abs()
    u_out = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[out.dtype]
    bound = u_out * ref.abs() * (1 + 2 * u_out) + (k + 2) * U32 * abs_dot * (1 + u_out) + 1e-30
    assert torch.isfinite(out).all(), "unwritten (poisoned) or non-finite output"
    return ((out.double() - ref).abs() / bound).cpu()


# ---- the reference --------------------------------------------------------------------------------------------


def test_reference_decoding() -> None:
    codes = torch.arange(16, dtype=torch.uint8).reshape(1, 16)
    values = unpack_e2m1(pack_e2m1(codes))
    assert values[0].tolist() == list(E2M1_VALUES) + [-v for v in E2M1_VALUES]
    assert torch.signbit(values[0, 8]).item()  # code 0x8 is -0.0
    packed = torch.tensor([[0x21, 0xF7]], dtype=torch.uint8)  # element 2j in the low nibble
    assert unpack_e2m1(packed)[0].tolist() == [0.5, 1.0, 6.0, -6.0]
    exponents = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    scales = e8m0_to_float(exponents)
    powers = torch.ldexp(torch.ones(255, dtype=torch.float64), torch.arange(255) - 127)
    assert torch.equal(scales[:255].double(), powers) and torch.isnan(scales[255])


@pytest.mark.parametrize("fmt", FMTS, ids=ids)
def test_reference_matches_compressed_tensors(fmt: MicroFormat) -> None:
    # What compressed-tensors' own decompressors rebuild (in bf16, the dtype they write).
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.mxfp8.base import MXFP8QuantizationCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    n, k = 24, 128
    weight, scales, global_scale = (t.cpu() if t is not None else None for t in make_weight(fmt, n, k, seed=7))
    scheme = preset_name_to_scheme(fmt.name.upper(), ["Linear"])
    if fmt == NVFP4:
        state = {"weight_packed": weight, "weight_scale": scales, "weight_global_scale": global_scale}
        rebuilt = NVFP4PackedCompressor.decompress(state, scheme)["weight"]
    elif fmt == MXFP4:
        rebuilt = MXFP4PackedCompressor.decompress({"weight_packed": weight, "weight_scale": scales}, scheme)["weight"]
    else:
        rebuilt = MXFP8QuantizationCompressor.decompress({"weight": weight, "weight_scale": scales}, scheme)["weight"]
    assert rebuilt.dtype == torch.bfloat16
    assert torch.equal(dequantize(fmt, weight, scales, global_scale, torch.bfloat16), rebuilt)


# ---- the kernel's dequantized operand -------------------------------------------------------------------------


def kernel_operand(fmt: MicroFormat, weight: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor | None,
                   dtype: torch.dtype, **kwargs: object) -> torch.Tensor:
    """The ``[N, K]`` weight the kernel multiplies, read back through an identity X: row i of the product is
    ``1 * w[:, i]`` plus exact zeros, so float32 output holds every bf16/fp16 element exactly."""
    k = weight.shape[1] * fmt.per_byte
    eye = torch.eye(k, dtype=dtype, device=DEVICE)
    return microscaled_gemm(eye, fmt, weight, scales, global_scale, out_dtype=torch.float32, **kwargs).T.cpu()


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("fmt", FMTS, ids=ids)
@pytest.mark.parametrize(("n", "k"), [(16, 64), (48, 96)])
def test_dequantized_operand_is_exact(fmt: MicroFormat, dtype: torch.dtype, n: int, k: int) -> None:
    # Wider E8M0 exponents than elsewhere (2**-17..2**7: fp16 subnormals, no overflow), every code value.
    weight, scales, global_scale = make_weight(fmt, n, k, seed=k + n, exponents=(110, 134))
    expected = reference(fmt, weight, scales, global_scale, dtype)
    if fmt.per_byte == 2:
        assert len(torch.unique(weight)) == 256
    else:
        assert len(torch.unique(weight.view(torch.uint8))) == 254  # every finite e4m3 value
    assert torch.isfinite(expected).all()
    operand = kernel_operand(fmt, weight, scales, global_scale, dtype)
    assert torch.equal(operand, expected.float())


def division_sensitive_case(dtype: torch.dtype) -> tuple[float, float]:
    """An e4m3 block scale ``s`` and a global scale ``g`` for which ``s / g`` and ``s * (1 / g)`` (float32) round
    to different ``dtype`` values. The two float32 results are adjacent, so the quotient must sit exactly on a
    rounding tie of ``dtype``: candidates ``g`` are built around ``s / t`` for such ties ``t``."""
    dropped = 16 if dtype == torch.bfloat16 else 13  # float32 mantissa bits that dtype does not keep
    t = torch.rand(2000, generator=generator(3)) * 4 + 0.25
    t = ((t.view(torch.int32) >> dropped << dropped) | (1 << (dropped - 1))).view(torch.float32)
    s = torch.arange(0x30, 0x50, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    g = (s[:, None] / t[None, :]).reshape(-1)
    g = torch.cat([(g.view(torch.int32) + step).view(torch.float32) for step in (-2, -1, 0, 1, 2)])
    s = s.repeat_interleave(len(t)).repeat(5)
    quotient, product = s / g, s * (1 / g)
    found = (quotient.to(dtype) != product.to(dtype)).nonzero()
    assert len(found), "no case tells division from reciprocal multiplication"
    i = found[0, 0].item()
    return s[i].item(), g[i].item()


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_nvfp4_scale_is_divided_not_multiplied_by_the_reciprocal(dtype: torch.dtype) -> None:
    scale, global_value = division_sensitive_case(dtype)
    n, k = 16, 64
    weight = torch.full((n, k // 2), 0x22, dtype=torch.uint8, device=DEVICE)  # every code 1.0: w = scale / global
    scales = torch.full((n, k // 16), scale).to(torch.float8_e4m3fn).to(DEVICE)
    global_scale = torch.tensor([global_value], device=DEVICE)
    expected = dequantize_nvfp4(weight.cpu(), scales.cpu(), global_scale.cpu(), dtype)
    one = torch.tensor(1.0)
    quotient = torch.tensor(scale) / global_scale.cpu()
    assert expected[0, 0] == quotient.to(dtype) != (torch.tensor(scale) * (one / global_scale.cpu())).to(dtype)
    assert torch.equal(kernel_operand(NVFP4, weight, scales, global_scale, dtype), expected.float())


# ---- the GEMM -------------------------------------------------------------------------------------------------

GEMM_SHAPES = [(1, 16, 64), (5, 48, 96), (1, 48, 96), (5, 16, 64)]


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("fmt", FMTS, ids=ids)
def test_gemm_matches_reference(fmt: MicroFormat, dtype: torch.dtype, shape: tuple[int, int, int],
                                bias: bool) -> None:
    m, n, k = shape
    weight, scales, global_scale = make_weight(fmt, n, k, seed=m + n + k)
    x = randn(m, k, dtype=dtype, seed=m)
    b = randn(n, dtype=dtype, seed=n) if bias else None
    expected = reference(fmt, weight, scales, global_scale, dtype)
    poison_device_memory()
    out = microscaled_gemm(x, fmt, weight, scales, global_scale, bias=b, out_dtype=torch.float32)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert excess(out, x, expected, b).max().item() <= 1.0
    # In the activation dtype (the default): the same, plus the output's rounding.
    out = microscaled_gemm(x, fmt, weight, scales, global_scale, bias=b)
    assert out.dtype == dtype
    assert excess(out, x, expected, b).max().item() <= 1.0


@pytest.mark.parametrize("fmt", FMTS, ids=ids)
def test_gemm_batched_activations(fmt: MicroFormat) -> None:
    # Leading dimensions are flattened into M, and strided (non-contiguous) activations are read correctly.
    n, k = 16, 64
    weight, scales, global_scale = make_weight(fmt, n, k, seed=5)
    x = randn(2, 3, 2 * k, seed=5)[..., ::2]
    out = microscaled_gemm(x, fmt, weight, scales, global_scale, out_dtype=torch.float32)
    assert out.shape == (2, 3, n)
    expected = reference(fmt, weight, scales, global_scale, torch.bfloat16)
    assert excess(out.reshape(6, n), x.reshape(6, k), expected).max().item() <= 1.0


@pytest.mark.parametrize("fmt", FMTS, ids=ids)
@pytest.mark.parametrize(
    ("k", "config"),
    [
        (224, TileConfig(16, 32, 64, 1, 4, 1, split_k=2)),  # 4 K steps as 2 + 2, the last one a tail
        (96, TileConfig(16, 16, 128, 1, 4, 1)),  # one K step of 128, its last quarter masked
        (160, TileConfig(32, 16, 32, 2, 4, 1, split_k=3)),  # 5 steps as 2 + 2 + 1
    ],
    ids=["split2", "block128", "split3"],
)
def test_gemm_tiles_and_split_k(fmt: MicroFormat, k: int, config: TileConfig) -> None:
    m, n = 5, 40
    weight, scales, global_scale = make_weight(fmt, n, k, seed=k)
    x = randn(m, k, seed=k)
    b = randn(n, seed=1)
    expected = reference(fmt, weight, scales, global_scale, torch.bfloat16)
    poison_device_memory()
    out = microscaled_gemm(x, fmt, weight, scales, global_scale, bias=b, out_dtype=torch.float32, config=config)
    assert excess(out, x, expected, b).max().item() <= 1.0


def test_special_values_reach_the_output() -> None:
    # A NaN e4m3 code (MXFP8) and a NaN E8M0 exponent (255) poison their own output column and no other.
    n, k = 16, 64
    x = randn(3, k, seed=9)
    weight, scales, _ = make_weight(MXFP8, n, k, seed=9)
    weight = weight.view(torch.uint8).clone()
    weight[2, 5] = 0xFF  # -NaN
    out = microscaled_gemm(x, MXFP8, weight.view(torch.float8_e4m3fn), scales, out_dtype=torch.float32).cpu()
    assert torch.isnan(out[:, 2]).all() and torch.isfinite(out[:, [c for c in range(n) if c != 2]]).all()
    packed, scales, _ = make_weight(MXFP4, n, k, seed=9)
    scales = scales.clone()
    scales[7, 1] = 255
    out = microscaled_gemm(x, MXFP4, packed, scales, out_dtype=torch.float32).cpu()
    assert torch.isnan(out[:, 7]).all() and torch.isfinite(out[:, [c for c in range(n) if c != 7]]).all()


def test_bad_operands_are_refused() -> None:
    n, k = 16, 64
    weight, scales, global_scale = make_weight(NVFP4, n, k)
    x = randn(2, k)
    with pytest.raises(ValueError, match="global"):
        microscaled_gemm(x, NVFP4, weight, scales)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        microscaled_gemm(x.float(), NVFP4, weight, scales, global_scale)
    with pytest.raises(ValueError, match="does not fit"):
        microscaled_gemm(randn(2, 2 * k), NVFP4, weight, scales, global_scale)
    with pytest.raises(ValueError, match="scales"):
        microscaled_gemm(x, NVFP4, weight, scales.view(torch.uint8), global_scale)
    with pytest.raises(ValueError, match="multiple of the scale group"):
        microscaled_gemm(randn(2, 48), "mxfp4", weight[:, :24], scales)
    with pytest.raises(ValueError, match="unknown"):
        microscaled_gemm(x, "fp4", weight, scales)
    assert microscaled_gemm(x[:0], "nvfp4", weight, scales, global_scale).shape == (0, n)


# ---- corruption is detected -----------------------------------------------------------------------------------

M_DETECT, N_DETECT, K_DETECT = 5, 48, 96


def sound_and_corrupted(fmt: MicroFormat, corrupt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(x, reference weight of the sound checkpoint, kernel output on the corrupted one, corrupted row)``."""
    n, k = N_DETECT, K_DETECT
    weight, scales, global_scale = make_weight(fmt, n, k, seed=11)
    x = randn(M_DETECT, k, seed=12)
    sound = reference(fmt, weight, scales, global_scale, torch.bfloat16)
    row, col = 29, 41  # weight element (row, col): nibble 1 of byte 20, scale group 2 (NVFP4) or 1 (MX)
    weight, scales = weight.clone(), scales.clone()
    if corrupt == "code":
        if fmt.per_byte == 2:
            weight[row, col // 2] ^= 0x4 << (4 * (col % 2))  # a flipped exponent bit: 0↔2, 0.5↔3, 1↔4, 1.5↔6
        else:
            as_bytes = weight.view(torch.uint8)
            as_bytes[row, col] = 0x38 if as_bytes[row, col] != 0x38 else 0x40  # 1.0, or 2.0 where it was 1.0
    elif corrupt == "scale":
        if fmt.scale is ScaleDtype.E4M3:
            scales.view(torch.uint8)[row, col // fmt.group] ^= 0x08  # an exponent bit: twice or half the scale
        else:
            scales[row, col // fmt.group] += 1  # twice the scale
    else:
        global_scale = (global_scale.view(torch.int32) ^ (1 << 20)).view(torch.float32)  # about 1.125x
    out = microscaled_gemm(x, fmt, weight, scales, global_scale, out_dtype=torch.float32)
    corrupted = reference(fmt, weight, scales, global_scale, torch.bfloat16)
    assert not torch.equal(corrupted, sound)
    # The kernel is faithful to what is stored: it matches the corrupted checkpoint's own reference.
    assert excess(out, x, corrupted).max().item() <= 1.0
    return x, sound, out, row


@pytest.mark.parametrize("fmt", FMTS, ids=ids)
@pytest.mark.parametrize("corrupt", ["code", "scale"])
def test_corrupted_code_or_block_scale_is_detected(fmt: MicroFormat, corrupt: str) -> None:
    x, sound, out, row = sound_and_corrupted(fmt, corrupt)
    ratio = excess(out, x, sound).amax(dim=0)
    assert ratio[row].item() > 100.0, f"weight row {row} is off by only {ratio[row].item():.3g}x the bound"
    others = torch.cat([ratio[:row], ratio[row + 1 :]])
    assert others.max().item() <= 1.0  # and only there


def test_corrupted_global_scale_is_detected() -> None:
    x, sound, out, _ = sound_and_corrupted(NVFP4, "global")
    ratio = excess(out, x, sound).amax(dim=0)
    assert (ratio > 100.0).all(), f"the smallest excess over the bound is {ratio.min().item():.3g}x"


# ---- larger shapes --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("fmt", FMTS, ids=ids)
def test_gemm_several_tiles(fmt: MicroFormat, dtype: torch.dtype) -> None:
    # Several M and N tiles (M, N and K all with edges), the interpreter's default configuration and split-K.
    m, n, k = 37, 100, 352
    weight, scales, global_scale = make_weight(fmt, n, k, seed=3)
    x = randn(m, k, dtype=dtype, seed=4)
    b = randn(n, dtype=dtype, seed=5)
    expected = reference(fmt, weight, scales, global_scale, dtype)
    for config in (None, TileConfig(16, 32, 64, 4, 4, 1, split_k=4)):
        out = microscaled_gemm(x, fmt, weight, scales, global_scale, bias=b, out_dtype=torch.float32, config=config)
        assert excess(out, x, expected, b).max().item() <= 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FMTS, ids=ids)
@pytest.mark.parametrize("m", [1, 16, 128, 4097])
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (28672, 4096), (4096, 14336)])
def test_gemm_gpu_shapes(fmt: MicroFormat, m: int, n: int, k: int) -> None:
    # The default (fallback or tuned) configurations on production shapes, split-K at small M included.
    weight, scales, global_scale = make_weight(fmt, n, k, seed=n)
    x = randn(m, k, seed=m)
    expected = reference(fmt, weight, scales, global_scale, torch.bfloat16)
    poison_device_memory()
    out = microscaled_gemm(x, fmt, weight, scales, global_scale, out_dtype=torch.float32)
    assert excess(out, x, expected).max().item() <= 1.0
    out = microscaled_gemm(x, fmt, weight, scales, global_scale)
    assert excess(out, x, expected).max().item() <= 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("fmt", FMTS, ids=ids)
@pytest.mark.parametrize("config", [None, TileConfig(128, 128, 128, 8, 8, 3), TileConfig(16, 64, 128, 1, 4, 4, 2)],
                         ids=["default", "wide", "narrow-split"])
def test_dequantized_operand_is_exact_gpu(fmt: MicroFormat, dtype: torch.dtype, config: TileConfig | None) -> None:
    # The GPU's conversions and division against the CPU reference, bit for bit, on the GPU's tile shapes.
    n, k = 1024, 512
    weight, scales, global_scale = make_weight(fmt, n, k, seed=2, exponents=(110, 134))
    operand = kernel_operand(fmt, weight, scales, global_scale, dtype, config=config)
    assert torch.equal(operand, reference(fmt, weight, scales, global_scale, dtype).float())
