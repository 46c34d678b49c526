"""The quantizer primitives against the compressed-tensors library, bit for bit."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
from compressed_tensors.quantization.utils import calculate_qparams
from hypothesis import given, settings
from hypothesis import strategies as st

from qconvert.quantizers import (
    dequantize_tiles,
    int_range,
    pack_int32,
    quantize_and_pack_symmetric,
    quantize_tiled,
    quantize_tiles,
    scale_divisor,
    share_group_amax,
    tile_scales,
    tile_shape,
    unpack_int32,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _group(weight: torch.Tensor, group_size: int) -> tuple[int, int]:
    """The tile of one group (``-1``: a whole row)."""
    return (1, weight.shape[1] if group_size == -1 else group_size)


def symmetric_int_scales(weight: torch.Tensor, num_bits: int, group_size: int) -> torch.Tensor:
    return tile_scales(weight, tile_shape(weight.shape, "group" if group_size != -1 else "channel", group_size),
                       scale_divisor("int", num_bits))


def quantize_symmetric_int(weight: torch.Tensor, scales: torch.Tensor, num_bits: int, group_size: int) -> torch.Tensor:
    return quantize_tiles(weight, scales, _group(weight, group_size), "int", num_bits)


def dequantize_int(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    return dequantize_tiles(codes, scales, _group(codes, group_size))


def _args(bits: int, group_size: int) -> QuantizationArgs:
    if group_size == -1:
        return QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="channel")
    return QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size)


def _weight(seed: int, out: int, inp: int, dtype: torch.dtype, zero_rows: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) * torch.rand(out, 1, generator=gen) * 0.1
    w[:zero_rows] = 0
    return w.to(dtype)


def test_format_md_check_values() -> None:
    int4 = torch.tensor([[-8, -7, 0, 1, 2, 3, 7, -1, 5, 5]], dtype=torch.int8)
    assert [v & 0xFFFFFFFF for v in pack_int32(int4, 4)[0].tolist()] == [0x7FBA9810, 0x000000DD]
    int8 = torch.tensor([[1, 2, -128, 127]], dtype=torch.int8)
    assert [v & 0xFFFFFFFF for v in pack_int32(int8, 8)[0].tolist()] == [0xFF008281]


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([4, 8]), rows=st.integers(1, 6), cols=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_pack_matches_compressed_tensors(bits: int, rows: int, cols: int, seed: int) -> None:
    qmin, qmax = int_range(bits)
    codes = torch.randint(qmin, qmax + 1, (rows, cols), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
    ours = pack_int32(codes, bits)
    assert torch.equal(ours, pack_to_int32(codes, bits))
    assert torch.equal(unpack_int32(ours, bits, cols), codes)
    assert torch.equal(unpack_from_int32(ours, bits, torch.Size((rows, cols))), codes)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([4, 8]),
    out=st.integers(1, 9),
    groups=st.integers(1, 4),
    group_size=st.sampled_from([8, 32, 128, -1]),
    dtype=st.sampled_from(DTYPES),
    zero_rows=st.integers(0, 2),
    seed=st.integers(0, 2**31),
)
def test_quantize_and_dequantize_match_compressed_tensors(
    bits: int, out: int, groups: int, group_size: int, dtype: torch.dtype, zero_rows: int, seed: int
) -> None:
    inp = groups * (group_size if group_size != -1 else 24)
    w = _weight(seed, out, inp, dtype, zero_rows)
    args = _args(bits, group_size)

    scales = symmetric_int_scales(w, bits, group_size)
    # Reference scales: the library's own qparams from the weight's min/max in the weight dtype, which
    # is what llm-compressor's observers feed it (checked against model_free_ptq: a zero group of a
    # bf16 weight is stored as bf16 eps, 0.0078125).
    grouped = w.view(out, -1, inp if group_size == -1 else group_size)
    ref_scale, _ = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    assert torch.equal(scales, ref_scale)
    assert torch.isfinite(scales).all() and (scales > 0).all()

    codes = quantize_symmetric_int(w, scales, bits, group_size)
    ref_codes = quantize(w, scales, torch.zeros_like(scales), args, dtype=torch.int8)
    assert torch.equal(codes, ref_codes)

    packed, packed_scales = quantize_and_pack_symmetric(w, bits, group_size)
    assert torch.equal(packed_scales, scales)
    assert torch.equal(packed, pack_to_int32(codes, bits))

    ours = dequantize_int(unpack_int32(packed, bits, inp), packed_scales, group_size)
    theirs = dequantize(unpack_from_int32(packed, bits, torch.Size((out, inp))), packed_scales, None, args)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)


def test_zero_group_gives_eps_scale_and_zero_codes() -> None:
    w = torch.zeros(2, 256, dtype=torch.bfloat16)
    w[1, 128:] = 1.0
    scales = symmetric_int_scales(w, 4, 128)
    assert scales[0].tolist() == [torch.finfo(torch.bfloat16).eps] * 2
    codes = quantize_symmetric_int(w, scales, 4, 128)
    assert not torch.isnan(dequantize_int(codes, scales, 128)).any()
    assert (codes[0] == 0).all() and (codes[1, :128] == 0).all()


def test_rounding_is_half_to_even_after_division_in_weight_dtype() -> None:
    # amax 7.5 gives scale 1.0 for int4, so codes are the values themselves, rounded half-to-even.
    w = torch.tensor([[7.5, 2.5, -2.5, 3.5, 0.5, -0.5, 1.5, -7.5]], dtype=torch.float32)
    codes = quantize_symmetric_int(w, symmetric_int_scales(w, 4, 8), 4, 8)
    assert codes.tolist() == [[7, 2, -2, 4, 0, 0, 2, -8]]
    # In bf16, 0.69921875 / 0.107421875 is 6.509 in fp32 (→ 7) but rounds to bf16 6.5 first (→ 6):
    # the reference divides in the weight dtype, so 6 is the right code.
    x = torch.tensor([[0.69921875, 0.8046875]], dtype=torch.bfloat16)  # amax/7.5 → scale 0.107421875
    scales = symmetric_int_scales(x, 4, 2)
    assert scales.item() == 0.107421875
    assert quantize_symmetric_int(x, scales, 4, 2).tolist() == [[6, 7]]


def test_groups_never_straddle_rows() -> None:
    with pytest.raises(ValueError, match="not a multiple of the group size"):
        symmetric_int_scales(torch.ones(4, 100), 4, 128)
    with pytest.raises(ValueError, match="not a multiple of the group size"):
        quantize_and_pack_symmetric(torch.ones(4, 100), 4, 128)


def test_quantizers_run_on_any_device_tensor_meta() -> None:
    # Device-agnostic: the same code runs on the meta device (shapes only), as it would on CUDA.
    w = torch.empty(64, 256, dtype=torch.bfloat16, device="meta")
    packed, scales = quantize_and_pack_symmetric(w, 4, 128)
    assert packed.shape == (64, 32) and packed.dtype == torch.int32 and packed.device.type == "meta"
    assert scales.shape == (64, 2) and scales.dtype == torch.bfloat16


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["int", "float"]),
    strategy=st.sampled_from(["block", "channel", "tensor"]),
    out=st.integers(1, 300),
    inp=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31),
)
def test_banded_tiled_quantization_equals_the_plain_pair(
    kind: str, strategy: str, out: int, inp: int, dtype: torch.dtype, seed: int
) -> None:
    w = _weight(seed, out, inp, dtype, zero_rows=min(out, 3))
    tile = tile_shape((out, inp), strategy, block=(128, 128))
    scales = tile_scales(w, tile, scale_divisor(kind, 8))
    values = quantize_tiles(w, scales, tile, kind, 8)
    banded_values, banded_scales = quantize_tiled(w, tile, kind, 8)
    assert torch.equal(banded_scales.reshape(scales.shape), scales)
    assert torch.equal(banded_values.view(torch.int8), values.view(torch.int8))
    args = QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy=strategy,
                            **({"block_structure": [128, 128]} if strategy == "block" else {}))
    reference = quantize(w, scales.reshape(1) if strategy == "tensor" else scales, None, args, dtype=values.dtype)
    assert torch.equal(reference.view(torch.int8), values.view(torch.int8))
    assert torch.equal(dequantize_tiles(values, scales, tile),
                       dequantize(values, scales.reshape(1) if strategy == "tensor" else scales, None, args))


@pytest.mark.parametrize("scheme", ["rtn4", "rtn8", "int8-block", "w8a8-int8", "fp8", "fp8-block", "fp8-tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 128), (200, 256), (130, 384), (1, 128), (96, 200)])
def test_shared_group_amax_changes_no_byte(scheme: str, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    """``qconvert batch`` computes |x| max per 128 inputs once for every scheme quantizing one tensor: each
    scheme's output from that tensor is bit for bit what it writes without it (uneven shapes included; a
    width that is not whole groups takes no shared amax)."""
    from qconvert.format import compress_weight
    from qconvert.schemes import get_scheme

    if scheme in ("rtn4", "rtn8") and shape[1] % 128:
        pytest.skip("group schemes quantize whole groups only (planning leaves such layers unquantized)")
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.05).to(dtype)
    plain = compress_weight("layer.weight", weight.clone(), get_scheme(scheme))
    shared = weight.clone()
    assert share_group_amax(shared) == (shape[1] % 128 == 0)
    with_shared = compress_weight("layer.weight", shared, get_scheme(scheme))
    assert plain.keys() == with_shared.keys()
    for name, tensor in plain.items():
        assert tensor.dtype == with_shared[name].dtype and torch.equal(
            tensor.view(torch.uint8) if tensor.dtype.is_floating_point else tensor,
            with_shared[name].view(torch.uint8) if tensor.dtype.is_floating_point else with_shared[name]), name
