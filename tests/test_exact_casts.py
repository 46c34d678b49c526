"""The exact casts of MXFP4 (issue 23) computed by table look-ups give the bytes of the float32 arithmetic they
replace: NVFP4 scales looked up by exponent byte, fp8-block codes looked up by packed byte and exponent difference.
The oracles are the float32 computations (``mxfp4_to_fp8_blocks_decoded``, and the NVFP4 scale arithmetic written
out below), run on every exponent byte and every packed byte, including the ranges the table clamps."""

from __future__ import annotations

import math

import pytest
import torch

from qconvert import microscaling
from qconvert.microscaling import (
    E4M3_MIN_EXPONENT,
    E8M0_BIAS,
    e2m1_values,
    e8m0_values,
    lookup,
    mx_block_exponents,
    mx_blocks_below,
    mx_fp8_block_losses,
    mx_global_shift,
    mx_inexact_blocks,
    mx_nvfp4_losses,
    mx_to_nvfp4,
    mxfp4_to_fp8_blocks,
    mxfp4_to_fp8_blocks_decoded,
    unpack_nibbles,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _nvfp4_scales_in_float32(exponents: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The e4m3 scales (each 32-block's twice) and inexact mask, computed per block in float32 (the oracle)."""
    shifted = exponents.to(torch.int32) - E8M0_BIAS + shift
    inexact = shifted < E4M3_MIN_EXPONENT
    scales = torch.exp2(shifted.clamp(min=E4M3_MIN_EXPONENT).to(torch.float32)).masked_fill_(inexact, 0.0)
    return scales.to(torch.float8_e4m3fn).repeat_interleave(2, dim=-1), inexact


@pytest.mark.parametrize("device", DEVICES)
def test_nvfp4_scales_by_table_equal_float32(device: str) -> None:
    every = torch.arange(255, dtype=torch.uint8, device=device).repeat(3, 2)  # [3, 510]: each byte but the NaN
    for shift in (mx_global_shift([every]), -5, 0, 17, 40, 140):
        cast = mx_to_nvfp4(every, shift)
        scales, inexact = _nvfp4_scales_in_float32(every, shift)
        assert cast.scales.dtype == torch.float8_e4m3fn and cast.scales.shape == scales.shape
        assert torch.equal(cast.scales.view(torch.uint8), scales.view(torch.uint8)), shift
        assert torch.equal(mx_inexact_blocks(every, shift), inexact), shift
        assert 0 < int(inexact.sum()) < inexact.numel() or shift in (140, -5, 0)  # both kinds of block, mostly



@pytest.mark.parametrize("device", DEVICES)
def test_nvfp4_normal_scales_by_arithmetic_equal_float32(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor whose scales are all normal e4m3 powers of two (15 exponents from its largest down) gets its scale
    bytes by integer arithmetic, not the table; one exponent lower (a subnormal scale) and the table is used."""
    exponents = (torch.arange(15, dtype=torch.uint8, device=device) + 100).repeat(4, 3)  # [4, 45]
    shift = mx_global_shift([exponents])
    scales, _ = _nvfp4_scales_in_float32(exponents, shift)

    def refuse(*args: object) -> None:
        raise AssertionError("the table was used")

    with monkeypatch.context() as patch:
        patch.setattr(microscaling, "lookup", refuse)
        cast = mx_to_nvfp4(exponents)
    assert torch.equal(cast.scales.view(torch.uint8), scales.view(torch.uint8))
    wider = exponents.clone()
    wider[2, 7] = 99
    with pytest.raises(AssertionError, match="the table was used"), monkeypatch.context() as patch:
        patch.setattr(microscaling, "lookup", refuse)
        mx_to_nvfp4(wider, shift)
    assert torch.equal(mx_to_nvfp4(wider, shift).scales.view(torch.uint8),
                       _nvfp4_scales_in_float32(wider, shift)[0].view(torch.uint8))

def test_lookup_across_bands_equals_indexing() -> None:
    """The CPU look-up works in bands of 2**20 indices: a tensor over three bands, uint8 and int32 indices."""
    generator = torch.Generator().manual_seed(3)
    table = torch.randint(-(1 << 15), 1 << 15, (4096,), dtype=torch.int32, generator=generator).to(torch.int16)
    index = torch.randint(0, 4096, (3, 1 << 20 | 7), dtype=torch.int32, generator=generator)
    assert torch.equal(lookup(table, index), table[index.to(torch.int64)])
    small = torch.randint(0, 256, (5, 9), dtype=torch.uint8, generator=generator)
    assert torch.equal(lookup(table, small), table[small.to(torch.int64)])


def _mxfp4(rows: int, columns: int, exponents: torch.Tensor, seed: int, device: str) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (rows, columns // 2), dtype=torch.uint8, generator=generator)
    return packed.to(device), exponents.to(device)


def _spread(rows: int, blocks: int, span: int, seed: int) -> torch.Tensor:
    """Exponents whose 128-row tiles each hold a random largest exponent and blocks down to ``span`` below it."""
    generator = torch.Generator().manual_seed(seed)
    top = torch.randint(span, E8M0_BIAS + 126, (-(-rows // 128), 1), generator=generator)
    top = top.repeat_interleave(128, dim=0)[:rows]
    return (top - torch.randint(0, span + 1, (rows, blocks), generator=generator)).to(torch.uint8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("scale_dtype", "span"), [(torch.bfloat16, 40), (torch.float32, 12), (torch.float32, 200),
                                                   (torch.float16, 20)])
def test_fp8_blocks_by_table_equal_float32(device: str, scale_dtype: torch.dtype, span: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles with blocks up to ``span`` exponents below their largest (within e4m3's exact span, beyond it, beyond
    the table's clamp at -24), partial tiles at the bottom and right, every packed byte: the table's bytes are the
    float32 cast's, and the table did the work (the float32 path is not called)."""
    rows, columns = 300, 416  # 3 tiles of 128 rows (the last partial) x 4 of 128 columns (the last 32 wide)
    exponents = _spread(rows, columns // 32, span, seed=span)
    if scale_dtype == torch.float16:  # fp16 holds 2**-24 .. 2**15: keep every tile's scale there
        exponents = (exponents.to(torch.int32) % 30 + E8M0_BIAS - 15).to(torch.uint8)
    exponents[:7, :2] = 0  # blocks MX writers store for zeros (2**-127)
    packed, exponents = _mxfp4(rows, columns, exponents, seed=1, device=device)
    want_codes, want_scales = mxfp4_to_fp8_blocks_decoded(packed, exponents, (128, 128), scale_dtype)

    def refuse(*args: object) -> None:
        raise AssertionError("the float32 cast was used")

    monkeypatch.setattr(microscaling, "mxfp4_to_fp8_blocks_decoded", refuse)
    codes, scales = mxfp4_to_fp8_blocks(packed, exponents, (128, 128), scale_dtype)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (rows, columns)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))
    assert torch.equal(scales, want_scales) and scales.dtype == scale_dtype


@pytest.mark.parametrize(("scale_dtype", "largest"), [(torch.bfloat16, 253), (torch.bfloat16, 255),
                                                      (torch.float16, 150)])
def test_fp8_blocks_outside_the_tables_premise_take_the_float32_cast(scale_dtype: torch.dtype, largest: int,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An exponent above 2**125 (values overflow float32; 255 is the NaN) or a tile scale the scale dtype does not
    hold (fp16 above 2**15): the float32 cast itself, called once."""
    exponents = _spread(256, 4, 10, seed=5)
    exponents[3, 1] = largest
    packed, exponents = _mxfp4(256, 128, exponents, seed=2, device="cpu")
    calls = []
    decoded = microscaling.mxfp4_to_fp8_blocks_decoded

    def spy(*args):  # type: ignore[no-untyped-def]
        calls.append(args)
        return decoded(*args)

    monkeypatch.setattr(microscaling, "mxfp4_to_fp8_blocks_decoded", spy)
    codes, scales = mxfp4_to_fp8_blocks(packed, exponents, (128, 128), scale_dtype)
    want_codes, want_scales = decoded(packed, exponents, (128, 128), scale_dtype)
    assert len(calls) == 1
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8)) and torch.equal(scales, want_scales)


@pytest.mark.parametrize("span", [10, 14, 15, 40])
def test_loss_checks_find_the_blocks_a_full_mask_finds(span: int) -> None:
    """The lossless shortcut (per-tile spans, the smallest nonzero exponent) says None exactly where the full
    masks are empty, and gives the full mask otherwise; tile exponents are each tile's largest, less 6."""
    rows, blocks = 300, 13  # partial tiles at the bottom and right
    exponents = _spread(rows, blocks, span, seed=span)
    exponents[:5, :3] = 0
    tile = (128, 128)
    tiles = mx_block_exponents(exponents, tile, torch.bfloat16)
    for i in range(tiles.shape[0]):
        for j in range(tiles.shape[1]):
            part = exponents[i * 128 : (i + 1) * 128, j * 4 : (j + 1) * 4]
            assert int(tiles[i, j]) == int(part.max()) - E8M0_BIAS - 6
    full = mx_blocks_below(exponents, tiles, tile)
    found = mx_fp8_block_losses(exponents, tile, torch.bfloat16)
    assert (found is None) == (not bool(full.any())) and (span <= 14) == (found is None)
    assert found is None or torch.equal(found, full)
    for shift in (mx_global_shift([exponents]), mx_global_shift([exponents]) - 20):
        full = _nvfp4_scales_in_float32(exponents, shift)[1] & (exponents != 0)
        found = mx_nvfp4_losses(exponents, shift)
        assert (found is None) == (not bool(full.any()))
        assert found is None or torch.equal(found, full)
    assert mx_nvfp4_losses(torch.zeros(4, 4, dtype=torch.uint8), 100) is None  # zero blocks: exact, never lossy


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_blocks_of_a_float16_tile_near_zero_get_a_scale_float16_holds(device: str) -> None:
    """A float16 model's 128x128 tile whose blocks are all stored with exponent 0 (2**-127, what MX writers store
    for zeros) or a few above it: 6 below its largest would be a scale float16 rounds to 0, and codes / 0 would be
    written as NaN. The scale is float16's smallest power of two (2**-24) instead; every code is then a signed zero
    or an e4m3 value, and each value rebuilt in float16 equals the source's in float16 (all zeros there, as
    2**-127 x 6 is far below float16's range); the blocks stored with a nonzero exponent lose nothing float16 can
    hold, and the loss check counts them (k - K < -8), zero-exponent blocks never."""
    rows, columns = 256, 256
    exponents = torch.full((rows, columns // 32), E8M0_BIAS, dtype=torch.uint8)  # 2**0 in the other tiles
    exponents[:128, :4] = 0
    exponents[:128, 4:] = E8M0_BIAS - 60  # 2**-60: a second tile column far below float16's range
    packed, exponents = _mxfp4(rows, columns, exponents, seed=3, device=device)
    codes, scales = mxfp4_to_fp8_blocks(packed, exponents, (128, 128), torch.float16)
    assert not bool(torch.isnan(codes.to(torch.float32)).any())
    assert float(scales[0, 0]) == 2.0**-24 and float(scales[0, 1]) == 2.0**-24 and float(scales[1, 0]) == 2.0**-6
    rebuilt = (codes.to(torch.float32) * scales.to(torch.float32).repeat_interleave(128, 0).repeat_interleave(128, 1))
    source = e2m1_values(unpack_nibbles(packed)) * e8m0_values(exponents).repeat_interleave(32, dim=1)
    assert torch.equal(rebuilt.to(torch.float16), source.to(torch.float16))
    lossy = mx_fp8_block_losses(exponents, (128, 128), torch.float16)
    assert lossy is not None and int(lossy.sum()) == 128 * 4  # the 2**-60 tile's blocks; the zero tile's never
    assert mx_fp8_block_losses(exponents, (128, 128), torch.bfloat16) is None  # bfloat16 holds 2**-133: exact


@pytest.mark.parametrize("device", DEVICES)
def test_e8m0_values_are_exact_powers_of_two_on_every_device(device: str) -> None:
    """Every E8M0 byte decodes to exactly 2**(e - 127) (0: the float32 subnormal 2**-127, which CUDA's exp2 misses by
    2**-22 relative) and 255 to NaN: the premise both fp8-block casts share, so no device check is needed."""
    exponents = torch.arange(256, dtype=torch.uint8, device=device)
    values = e8m0_values(exponents).cpu()
    want = torch.tensor([math.ldexp(1.0, e - E8M0_BIAS) for e in range(255)], dtype=torch.float32)
    assert torch.equal(values[:255].view(torch.int32), want.view(torch.int32))
    assert bool(values[255].isnan())
