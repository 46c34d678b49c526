"""The Triton kernels against torch references: bit for bit for the quantizers, within derived
rounding bounds for the GEMMs. On a machine without a GPU they run in Triton's interpreter on small
shapes; on a GPU the same tests also run the larger shapes (incl. ANCHORS.md's) with poisoned output
memory. The seed-004 defects each have a test that the seed's behaviour would fail."""

from __future__ import annotations

import pytest
import torch

from qconvert import kernels
from qconvert import quantizers as Q
from qconvert.kernels.configs import TileConfig
from qconvert.kernels.split_k import k_ranges
from qconvert.verification import FP8_MMA_GAMMA, error_bound
from tests.conftest import DEVICE, poison_device_memory

GPU = DEVICE.type == "cuda"
U32 = 2.0**-24
FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point and a.dtype.itemsize == 1:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def randn(*shape: int, dtype: torch.dtype = torch.bfloat16, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)


ACT_SHAPES = [(1, 128), (7, 200), (100, 384), (3, 1000)] + ([(4097, 4096), (16, 14336), (128, 7168)] if GPU else [])


@pytest.mark.parametrize("kind", ["int", "float"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", ACT_SHAPES)
@pytest.mark.parametrize("group", [128, 10**9])
def test_activation_quant_is_bit_exact(kind: str, dtype: torch.dtype, shape: tuple[int, int], group: int) -> None:
    x = randn(*shape, dtype=dtype, scale=3.0, seed=shape[0])
    x[0, : min(128, shape[1])] = 0  # an all-zero group: a tiny scale, zeros, never NaN
    poison_device_memory()
    values, scales = kernels.quantize_activations(x, group, kind)
    # The reference runs on the CPU, as the converter does: torch on CUDA divides by a scalar as a
    # multiplication by its reciprocal, which is not the converter's (or compressed-tensors') arithmetic.
    ref_values, ref_scales = Q.quantize_activation_groups(x.cpu(), group, kind)
    assert same_bits(values.cpu(), ref_values)
    assert torch.equal(scales.cpu(), ref_scales)
    assert torch.isfinite(scales).all() and (scales > 0).all()
    back = kernels.dequantize_activations(values, scales, group, torch.float32)
    assert torch.equal(back.cpu(), Q.dequantize_activation_groups(ref_values, ref_scales, group))


@pytest.mark.parametrize("kind", ["int", "float"])
def test_activation_quant_static_scale(kind: str) -> None:
    x = randn(9, 300, scale=2.0)
    scale = torch.tensor([0.01], device=DEVICE)
    values, scales = kernels.quantize_activations(x, kind=kind, static_scale=scale)
    q = x.cpu().float() / scale.cpu()
    ref = (q.clamp(-448, 448).to(torch.float8_e4m3fn) if kind == "float" else q.clamp(-128, 127).round().to(torch.int8))
    assert same_bits(values.cpu(), ref)
    assert torch.equal(scales.reshape(-1), scale.expand(9))


def test_seed_defect_rounding_not_truncation() -> None:
    # amax 127 → scale 1.0: 2.6 must become 3 (the seed's cast truncates to 2), -2.6 → -3, 2.5 → 2 (even).
    x = torch.tensor([[127.0, 2.6, -2.6, 2.5, 3.5, -0.4] + [0.0] * 122], device=DEVICE)
    values, scales = kernels.quantize_activations(x, 128, "int")
    assert scales.item() == 1.0
    assert values[0, :6].tolist() == [127, 3, -3, 2, 4, 0]


def test_seed_defect_clamp_and_zero_blocks_in_weight_quant() -> None:
    # bf16 rounding of the scale can put amax/scale above 127 (→ must clamp to 127, not wrap to -128).
    w = torch.zeros(256, 256, dtype=torch.bfloat16)
    w[0, 0] = 1.0039062  # amax/127.5 rounds down in bf16, so w/scale > 127.5
    w[130:, 130:] = torch.randn(126, 126).to(torch.bfloat16)
    w = w.to(DEVICE)
    values, scales = kernels.quantize_weight_blocks(w, (128, 128), "int")
    assert values[0, 0].item() == 127
    assert torch.isfinite(scales.float()).all() and (scales.float() > 0).all()
    assert scales[0, 1].item() == torch.finfo(torch.bfloat16).eps and (values[:128, 128:] == 0).all()
    ref_values, ref_scales = Q.quantize_tiled(w.cpu(), (128, 128), "int")
    assert same_bits(values.cpu(), ref_values) and torch.equal(scales.cpu(), ref_scales)


WEIGHT_SHAPES = [(128, 128), (300, 200), (256, 384), (130, 1000)] + ([(4096, 4096), (28672, 4096)] if GPU else [])


@pytest.mark.parametrize("kind", ["int", "float"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
def test_weight_block_quant_matches_converter(kind: str, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    w = randn(*shape, dtype=dtype, scale=0.02, seed=shape[1])
    w[:128, :128] = 0
    w[-1, -1] = 7.5  # one outlier block
    poison_device_memory()
    values, scales = kernels.quantize_weight_blocks(w, (128, 128), kind)
    ref_values, ref_scales = Q.quantize_tiled(w.cpu(), (128, 128), kind)  # CPU: see above
    assert same_bits(values.cpu(), ref_values)
    assert torch.equal(scales.cpu(), ref_scales)
    back = kernels.dequantize_weight_blocks(values, scales, (128, 128))
    assert torch.equal(back.cpu(), Q.dequantize_tiles(ref_values, ref_scales, (128, 128)))


def test_fp8_small_negatives_keep_their_sign() -> None:
    # A negative quotient that rounds to zero is e4m3fn -0 (0x80) in torch's cast; on the GPU, Triton's
    # negation of +0 gives +0, so a kernel that rounds |x| and negates writes 0x00 instead.
    x = torch.zeros(4, 256)
    x[:, 0] = 448.0
    x[:, 1:100] = -torch.linspace(1e-5, 9e-4, 99)  # below half the smallest e4m3 step (2**-10): -0
    x[:, 100:200] = torch.linspace(-300.0, 300.0, 100)
    x = x.to(DEVICE)
    values, _ = kernels.quantize_activations(x, 128, "float")
    ref_values, _ = Q.quantize_activation_groups(x.cpu(), 128, "float")
    assert (ref_values.view(torch.uint8)[:, 1:100] == 0x80).all()
    assert same_bits(values.cpu(), ref_values)
    w_values, _ = kernels.quantize_weight_blocks(x.to(torch.bfloat16), (128, 128), "float")
    assert same_bits(w_values.cpu(), Q.quantize_tiled(x.cpu().to(torch.bfloat16), (128, 128), "float")[0])


def test_fake_quant_static_int8_is_bit_exact() -> None:
    for dtype in FLOATS:
        x = randn(33, 257, dtype=dtype, scale=4.0)
        x[0, 0] = 1e4  # clamps
        scale = torch.tensor([0.03], device=DEVICE)
        expected = Q.fake_quant_static_int8(x.cpu(), scale.cpu())
        assert torch.equal(kernels.fake_quant_static_int8(x, scale).cpu(), expected)


def test_e4m3fnuz_read_back_exactly() -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
    scales = torch.full((16, 1), 0.5)
    fnuz = Q.e4m3fn_to_e4m3fnuz(codes)
    back, half = kernels.e4m3fnuz_to_e4m3fn(fnuz, scales * 2)
    original = codes.float() * scales
    restored = back.float() * half
    finite = torch.isfinite(original)
    assert torch.equal(restored[finite], original[finite])
    assert torch.isnan(restored[~finite]).all()


def gemm_reference(a_values, a_scales, a_group, b_values, b_scales, b_tile, bias=None):
    """Float64 product of the dequantized operands (exact for 8-bit codes), and Σ|a||b| for the bound."""
    k = a_values.shape[-1]
    a = Q.dequantize_activation_groups(a_values.cpu(), a_scales.cpu(), a_group, torch.float64)
    b = Q.dequantize_tiles(b_values.cpu().to(torch.float64), b_scales.cpu().to(torch.float64).reshape(
        -(-b_values.shape[0] // b_tile[0]), -(-k // b_tile[1])), b_tile)
    ref = a @ b.T + (bias.cpu().double() if bias is not None else 0)
    abs_dot = a.abs() @ b.abs().T + (bias.cpu().double().abs() if bias is not None else 0)
    return ref, abs_dot


def assert_within_bound(out: torch.Tensor, ref: torch.Tensor, abs_dot: torch.Tensor, gamma: float) -> None:
    assert torch.isfinite(out).all(), "unwritten (poisoned) or non-finite output"
    bound = error_bound(ref, abs_dot, gamma, out.dtype, 0.0)
    ratio = ((out.cpu().double() - ref).abs() / bound).max().item()
    assert ratio <= 1.0, f"error {ratio:.3g} x the rounding bound"


GEMM_SHAPES = [(1, 200, 300), (7, 256, 384), (100, 130, 260), (33, 128, 128)]
if GPU:
    GEMM_SHAPES += [(m, n, k) for m in (1, 16, 128, 4097) for n, k in ((4096, 4096), (6144, 4096), (4096, 14336))]


@pytest.mark.parametrize("kind", ["int", "float"])
@pytest.mark.parametrize("shape", [pytest.param(shape, marks=[pytest.mark.slow] if shape == (100, 130, 260) else [])
                                   for shape in GEMM_SHAPES])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_block_scaled_gemm(kind: str, shape: tuple[int, int, int], out_dtype: torch.dtype) -> None:
    m, n, k = shape
    x = randn(m, k, seed=m)
    w = randn(n, k, scale=0.05, seed=n + k)
    bias = randn(n, seed=3)
    a_values, a_scales = kernels.quantize_activations(x, 128, kind)
    b_values, b_scales = kernels.quantize_weight_blocks(w, (128, 128), kind)
    poison_device_memory()
    out = kernels.scaled_gemm(a_values, a_scales, b_values, b_scales, bias=bias, out_dtype=out_dtype)
    ref, abs_dot = gemm_reference(a_values, a_scales, 128, b_values, b_scales, (128, 128), bias)
    gamma = (-(-k // 128) * 4 + 128) * U32 if kind == "float" else -(-k // 128) * 4 * U32
    if GPU and kind == "float":
        gamma += FP8_MMA_GAMMA
    assert_within_bound(out, ref, abs_dot, gamma)


@pytest.mark.parametrize("kind", ["int", "float"])
@pytest.mark.parametrize("shape", GEMM_SHAPES[:3])
def test_channel_scaled_gemm(kind: str, shape: tuple[int, int, int]) -> None:
    m, n, k = shape
    x = randn(m, k, seed=m)
    w = randn(n, k, scale=0.05, seed=n)
    a_values, a_scales = kernels.quantize_activations(x, 10**9, kind)
    b_values, b_scales = Q.quantize_tiled(w, (1, k), kind)
    out = kernels.scaled_gemm(a_values, a_scales, b_values, b_scales, out_dtype=torch.float32)
    ref, abs_dot = gemm_reference(a_values, a_scales, k, b_values, b_scales, (1, k))
    gamma = 4 * U32  # one exact int32 dot, two multiplies
    if kind == "float":  # one float32 (GPU: fp8 tensor-core) accumulation over the whole of K
        gamma += FP8_MMA_GAMMA * -(-k // 128) if GPU else k * U32
    assert_within_bound(out, ref, abs_dot, gamma)


def test_seed_defect_fp16_overflow_is_the_callers_choice() -> None:
    # Outputs past fp16's 65504: the seed always wrote fp16 (inf); here bf16/fp32 outputs are right.
    m, n, k = 4, 128, 256
    a_values = torch.full((m, k), 127, dtype=torch.int8, device=DEVICE)
    a_scales = torch.full((m, 2), 2.0, device=DEVICE)
    b_values = torch.full((n, k), 127, dtype=torch.int8, device=DEVICE)
    b_scales = torch.full((1, 2), 1.0, dtype=torch.bfloat16, device=DEVICE)
    expected = 127 * 127 * 2.0 * k  # 8.26e6
    for dtype in (torch.float32, torch.bfloat16):
        out = kernels.scaled_gemm(a_values, a_scales, b_values, b_scales, out_dtype=dtype)
        assert torch.allclose(out.float().cpu(), torch.full((m, n), expected), rtol=2**-8)
    assert torch.isinf(kernels.scaled_gemm(a_values, a_scales, b_values, b_scales, out_dtype=torch.float16)).all()


def test_seed_defect_rows_past_m_are_masked_not_wrapped() -> None:
    # M = 7 in a 16-row tile: the seed's `% M` reloads rows 0..8 for rows 7..15; nothing may leak.
    m, n, k = 7, 128, 256
    x = randn(m, k)
    a_values, a_scales = kernels.quantize_activations(x, 128, "int")
    b_values, b_scales = kernels.quantize_weight_blocks(randn(n, k, scale=0.1), (128, 128), "int")
    out = kernels.scaled_gemm(a_values, a_scales, b_values, b_scales, out_dtype=torch.float32)
    single = torch.stack([kernels.scaled_gemm(a_values[i : i + 1], a_scales[i : i + 1], b_values, b_scales,
                                              out_dtype=torch.float32)[0] for i in range(m)])
    assert out.shape == (m, n) and torch.equal(out, single)


@pytest.mark.parametrize("kind", ["int", "float"])
@pytest.mark.parametrize("block", [True, False])
def test_split_k_gemm(kind: str, block: bool) -> None:
    # K = 5 groups cut into 3 ranges (2 + 2 + 1 groups) and a K tail: partials summed in float32.
    m, n, k = 5, 200, 600
    assert k_ranges(k, 128, 3) == (256, 3)
    x = randn(m, k, seed=11)
    w = randn(n, k, scale=0.05, seed=12)
    bias = randn(n, seed=13)
    if block:
        a_values, a_scales = kernels.quantize_activations(x, 128, kind)
        b_values, b_scales = kernels.quantize_weight_blocks(w, (128, 128), kind)
        ref, abs_dot = gemm_reference(a_values, a_scales, 128, b_values, b_scales, (128, 128), bias)
    else:
        a_values, a_scales = kernels.quantize_activations(x, 10**9, kind)
        b_values, b_scales = (t.to(DEVICE) for t in Q.quantize_tiled(w.cpu(), (1, k), kind))  # per channel
        ref, abs_dot = gemm_reference(a_values, a_scales, k, b_values, b_scales, (1, k), bias)
    config = TileConfig(16, 64, 128, 1, 4, 2, split_k=3)
    poison_device_memory()
    out = kernels.scaled_gemm(a_values, a_scales, b_values, b_scales, bias=bias, out_dtype=torch.float32,
                              config=config)
    groups = -(-k // 128)
    gamma = (groups * 4 + 3 + (128 if kind == "float" else 0)) * U32  # + 3: summing the partials
    if GPU and kind == "float":
        gamma += FP8_MMA_GAMMA
    assert_within_bound(out, ref, abs_dot, gamma)


@pytest.mark.parametrize("kind", ["int", "float"])
def test_deferred_scales_change_nothing(kind: str) -> None:
    # The software-pipelined promotion adds the same scaled group products in the same order.
    m, n, k = 20, 160, 520
    a_values, a_scales = kernels.quantize_activations(randn(m, k, seed=41), 128, kind)
    b_values, b_scales = kernels.quantize_weight_blocks(randn(n, k, scale=0.05, seed=42), (128, 128), kind)
    outs = [kernels.scaled_gemm(a_values, a_scales, b_values, b_scales, out_dtype=torch.float32,
                                config=TileConfig(16, 64, 128, 1, 4, 2, split_k=split, defer_scales=defer))
            for split in (1, 2) for defer in (False, True)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[2], outs[3])


@pytest.mark.parametrize("kind", ["int", "float"])
def test_gemm_quant_fuses_the_output_quantization(kind: str) -> None:
    m, n, k = 37, 384, 256
    x = randn(m, k, seed=5)
    a_values, a_scales = kernels.quantize_activations(x, 128, kind)
    b_values, b_scales = kernels.quantize_weight_blocks(randn(n, k, scale=0.05, seed=6), (128, 128), kind)
    bias = randn(n, seed=7)
    for split in (1, 2):  # split-K moves the quantization into the reduction of the partials
        config = TileConfig(16, 64, 128, 1, 4, 2, split_k=split)
        codes, scales = kernels.scaled_gemm_quant(a_values, a_scales, b_values, b_scales, bias=bias,
                                                  out_kind=kind, config=config)
        full = kernels.scaled_gemm(a_values, a_scales, b_values, b_scales, bias=bias, out_dtype=torch.float32,
                                   config=config)
        ref_codes, ref_scales = Q.quantize_activation_groups(full.cpu(), 128, kind)
        # Same arithmetic as the unfused GEMM + quantizer: identical scales and codes.
        assert torch.equal(scales.cpu(), ref_scales)
        assert same_bits(codes.cpu(), ref_codes)


def test_gelu_requant() -> None:
    x = randn(19, 300, scale=3.0)
    values, scales = kernels.quantize_activations(x, 128, "int")
    codes, out_scales = kernels.gelu_requant(values, scales)
    dequantized = Q.dequantize_activation_groups(values.cpu(), scales.cpu(), 128)
    ref_codes, ref_scales = Q.quantize_activation_groups(torch.nn.functional.gelu(dequantized), 128, "int")
    codes, out_scales = codes.cpu(), out_scales.cpu()
    # erf may differ in its last bit between libdevice and torch: scales to 1e-6, codes by at most 1.
    assert torch.allclose(out_scales, ref_scales, rtol=1e-6, atol=0)
    assert (codes.int() - ref_codes.int()).abs().max().item() <= 1
    assert (codes == ref_codes).float().mean().item() > 0.999


PACKED_CASES = [(bits, group, m) for bits in (4, 8) for group in (128, 32, -1) for m in (1, 7, 100)]
# M = 100 (several M tiles) takes 10-15 s a case in the interpreter: one runs in make test, the rest in make slow.
PACKED_PARAMS = [pytest.param(*case, marks=[pytest.mark.slow] if case[2] == 100 and case[:2] != (8, -1) else [])
                 for case in PACKED_CASES]


@pytest.mark.parametrize(("bits", "group", "m"), PACKED_PARAMS)
def test_packed_weight_only_gemm(bits: int, group: int, m: int) -> None:
    n, k = (200, 384) if group != -1 else (130, 200)
    x = randn(m, k, seed=m)
    w = randn(n, k, scale=0.05, seed=bits)
    packed, scales = Q.quantize_and_pack_symmetric(w.cpu(), bits, group)
    bias = randn(n, seed=1)
    poison_device_memory()
    out = kernels.packed_gemm(x, packed.to(DEVICE), scales.to(DEVICE), bits, k, bias=bias, out_dtype=torch.float32)
    codes = Q.unpack_int32(packed, bits, k)
    weight = Q.dequantize_tiles(codes, scales, (1, k if group == -1 else group))  # bf16, as the kernel rounds
    ref = x.cpu().double() @ weight.double().T + bias.cpu().double()
    abs_dot = x.cpu().double().abs() @ weight.double().abs().T + bias.cpu().double().abs()
    assert_within_bound(out, ref, abs_dot, k * U32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 128, -1])
def test_packed_gemm_wide_tiles(bits: int, group: int) -> None:
    # BLOCK_M = 64 unpacks whole K steps into K order (the wgmma path), groups narrower than the step
    # or not tiling it included; K = 320 leaves a tail.
    m, n, k = 70, 64, 320 if group != 128 else 384
    x = randn(m, k, seed=31)
    packed, scales = Q.quantize_and_pack_symmetric(randn(n, k, scale=0.05, seed=32).cpu(), bits, group)
    out = kernels.packed_gemm(x, packed.to(DEVICE), scales.to(DEVICE), bits, k, out_dtype=torch.float32,
                              config=TileConfig(64, 32, 256, 1, 4, 2))
    weight = Q.dequantize_tiles(Q.unpack_int32(packed, bits, k), scales, (1, k if group == -1 else group))
    ref = x.cpu().double() @ weight.double().T
    assert_within_bound(out, ref, x.cpu().double().abs() @ weight.double().abs().T, k * U32)


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_gemm_split_k(bits: int) -> None:
    # 3 ranges over K = 600 (int4: 5 steps of 128 as 2 + 2 + 1; int8: 10 steps of 64 as 4 + 4 + 2), the
    # last step a tail. (Each of a step's per-word dots needs 16 words: BLOCK_K is 128 for int4, 64 for int8.)
    m, n, k = 3, 96, 600
    assert k_ranges(k, 16 * 32 // bits, 3) == (256, 3)
    x = randn(m, k, seed=21)
    packed, scales = Q.quantize_and_pack_symmetric(randn(n, k, scale=0.05, seed=22).cpu(), bits, -1)
    bias = randn(n, seed=23)
    poison_device_memory()
    out = kernels.packed_gemm(x, packed.to(DEVICE), scales.to(DEVICE), bits, k, bias=bias, out_dtype=torch.float32,
                              config=TileConfig(16, 32, 32, 1, 4, 2, split_k=3))
    weight = Q.dequantize_tiles(Q.unpack_int32(packed, bits, k), scales, (1, k))
    ref = x.cpu().double() @ weight.double().T + bias.cpu().double()
    abs_dot = x.cpu().double().abs() @ weight.double().abs().T + bias.cpu().double().abs()
    assert_within_bound(out, ref, abs_dot, (k + 3) * U32)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 16, 128, 4097])
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (28672, 4096), (4096, 14336)])
def test_packed_gemm_anchor_shapes(bits: int, m: int, n: int, k: int) -> None:
    x = randn(m, k, seed=m)
    w = randn(n, k, scale=0.02, seed=n)
    packed, scales = Q.quantize_and_pack_symmetric(w, bits, 128)
    poison_device_memory()
    out = kernels.packed_gemm(x, packed, scales, bits, k, out_dtype=torch.float32)
    weight = Q.dequantize_tiles(Q.unpack_int32(packed, bits, k), scales, (1, 128)).float()
    ref = x.float() @ weight.T
    abs_dot = x.float().abs() @ weight.abs().T
    bound = error_bound(ref, abs_dot, k * U32, torch.float32, (k + 2) * U32)
    assert torch.isfinite(out).all() and ((out - ref).abs() <= bound).all()


def test_config_lookup_prefers_the_tuned_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from qconvert.kernels import configs

    tuned = {("GPU X", "int8-block", 4096, 4096, 16): TileConfig(16, 64, 128, 1, 4, 4, 4),
             ("GPU X", "int8-block", 4096, 4096, 1024): TileConfig(128, 256, 128, 8, 8, 3)}
    monkeypatch.setattr(configs, "TUNED", tuned)
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "gpu_name", lambda _device: "GPU X")
    cuda = torch.device("cuda")
    assert configs.gemm_config("int8-block", 7, 4096, 4096, cuda).split_k == 4  # bucket 16
    assert configs.gemm_config("int8-block", 300, 4096, 4096, cuda).block_n == 256  # next tuned: 1024
    assert configs.gemm_config("int8-block", 10**5, 4096, 4096, cuda).block_n == 256  # past the largest
    assert configs.gemm_config("int8-block", 7, 4096, 8192, cuda) == configs.fallback("int8-block", 7, 4096, 8192)
    # The fallback splits K for small M so that narrow tiles still cover the SMs.
    assert configs.fallback("int8-block", 1, 4096, 4096).split_k > 1
    assert configs.fallback("int8-block", 1, 28672, 4096).split_k == 1
    assert configs.fallback("int8-block", 4096, 4096, 4096).split_k == 1


def _shipped_configs() -> list:
    if not GPU:
        return []
    from qconvert.kernels.configs import TUNED, gpu_name

    return [pytest.param(key, cfg, id="-".join(map(str, key[1:]))) for key, cfg in TUNED.items()
            if key[0] == gpu_name(DEVICE)]


@pytest.mark.gpu
@pytest.mark.parametrize(("key", "config"), _shipped_configs())
def test_every_shipped_config(key: tuple, config: TileConfig) -> None:
    # Each committed tile configuration, on its own N and K, within the same bounds as the other tests
    # (float64 reference on the GPU: products of codes and scales are exact there).
    _, kernel, n, k, bucket = key
    m = min(bucket, 300)
    x = randn(m, k, seed=bucket)
    w = randn(n, k, scale=0.02, seed=n)
    groups = -(-k // 128)
    poison_device_memory()
    if kernel == "w4a16":
        packed, scales = Q.quantize_and_pack_symmetric(w, 4, 128)
        out = kernels.packed_gemm(x, packed, scales, 4, k, out_dtype=torch.float32, config=config)
        a = x.double()
        b = Q.dequantize_tiles(Q.unpack_int32(packed, 4, k), scales, (1, 128)).double()
        gamma = (k + config.split_k) * U32
    else:
        kind = "float" if kernel.startswith("fp8") else "int"
        a_values, a_scales = kernels.quantize_activations(x, 128, kind)
        b_values, b_scales = kernels.quantize_weight_blocks(w, (128, 128), kind)
        out = kernels.scaled_gemm(a_values, a_scales, b_values, b_scales, out_dtype=torch.float32, config=config)
        a = Q.dequantize_activation_groups(a_values, a_scales, 128, torch.float64)
        b = Q.dequantize_tiles(b_values.double(), b_scales.double(), (128, 128))
        gamma = (groups * 4 + config.split_k + (128 if kind == "float" else 0)) * U32
        gamma += FP8_MMA_GAMMA if kind == "float" else 0.0
    ref = a @ b.T
    assert_within_bound(out, ref.cpu(), (a.abs() @ b.abs().T).cpu(), gamma)


@pytest.mark.parametrize("rowwise", [True, False])
@pytest.mark.parametrize("per_tensor", [True, False])
def test_fp8_dispatch(monkeypatch: pytest.MonkeyPatch, rowwise: bool, per_tensor: bool) -> None:
    from qconvert.kernels import fp8

    if not rowwise:
        monkeypatch.setattr(fp8, "rowwise_supported", lambda *_: False)
    m, n, k = 33, 256, 384
    x = randn(m, k, seed=2)
    w = randn(n, k, scale=0.05, seed=4)
    bias = randn(n, seed=8)
    if per_tensor:
        b_values, b_scales = Q.quantize_tiled(w, (n, k), "float")
        a_scale = (x.abs().amax().float() / 448).reshape(1)
        a_values, a_scales = kernels.quantize_activations(x, kind="float", static_scale=a_scale)
        a_scales, b_scales = a_scale, b_scales.reshape(1)
    else:
        b_values, b_scales = Q.quantize_tiled(w, (1, k), "float")
        a_values, a_scales = kernels.quantize_activations(x, 10**9, "float")
    out = kernels.fp8_linear(a_values, a_scales, b_values, b_scales, bias=bias, out_dtype=torch.bfloat16)
    ref, abs_dot = gemm_reference(a_values, a_scales.expand(m, 1) if a_scales.numel() == 1 else a_scales, k,
                                  b_values, b_scales.reshape(-1, 1).expand(n, 1) if b_scales.numel() == 1
                                  else b_scales, (1, k), bias)
    gamma = (k + 4) * U32 + (FP8_MMA_GAMMA if GPU else 0.0)  # cuBLAS promotes, as verify assumes
    # The row-wise path adds the bias after a bf16 output: one more bf16 rounding of the product.
    assert_within_bound(out.float(), ref, abs_dot * (1 + 2 * 2.0**-8), gamma + 2 * 2.0**-8)
