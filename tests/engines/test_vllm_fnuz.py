"""``--fnuz`` / ``convert --op fnuz`` against vLLM's own ``normalize_e4m3fn_to_e4m3fnuz`` (seed 001), called from
the released vLLM package: bit for bit on every code and every scale. Nothing is stubbed here; the function is
pure torch. Runs in the vLLM venv (``make engines``); skipped where vLLM is not importable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

w8a8_utils = pytest.importorskip("vllm.model_executor.layers.quantization.utils.w8a8_utils",
                                 reason="vLLM is not importable here (make engines runs this in its venv)")

from qconvert.cli import main  # noqa: E402
from qconvert.quantizers import e4m3fn_to_e4m3fnuz  # noqa: E402
from tests.conftest import build_tiny_llama  # noqa: E402

E4M3FN_NANS = (0x7F, 0xFF)


def vllm_normalize(weight: torch.Tensor, scale: torch.Tensor, input_scale: torch.Tensor | None = None):
    # vLLM's function writes into its argument (seed 001's defect): give it copies.
    return w8a8_utils.normalize_e4m3fn_to_e4m3fnuz(weight.clone(), scale.clone(),
                                                   None if input_scale is None else input_scale.clone())


def test_every_code_and_scale_equals_vllm() -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
    scale = torch.tensor([[0.0123]], dtype=torch.bfloat16)
    input_scale = torch.tensor([0.5], dtype=torch.float32)
    theirs, their_scale, their_input = vllm_normalize(codes, scale, input_scale)
    ours = e4m3fn_to_e4m3fnuz(codes)
    assert ours.dtype == theirs.dtype == torch.float8_e4m3fnuz
    ours_bits, theirs_bits = ours.view(torch.uint8).flatten(), theirs.view(torch.uint8).flatten()
    finite = [c for c in range(256) if c not in E4M3FN_NANS]
    assert torch.equal(ours_bits[finite], theirs_bits[finite])  # 254 codes, incl. 0x80 (-0) -> 0
    # The two e4m3fn NaN codes: vLLM leaves their bits, which fnuz reads as +-240 (a NaN becomes a number);
    # ours write the fnuz NaN. Our quantizers never write NaN codes (NaN inputs are refused).
    assert theirs_bits[list(E4M3FN_NANS)].tolist() == list(E4M3FN_NANS)
    assert ours_bits[list(E4M3FN_NANS)].tolist() == [0x80, 0x80]
    assert torch.equal(scale * 2, their_scale) and torch.equal(input_scale * 2, their_input)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


@pytest.mark.parametrize("scheme", ["fp8", "fp8-block", "fp8-tensor"])
def test_fnuz_outputs_equal_vllm_normalizing_our_e4m3fn(tmp_path: Path, scheme: str) -> None:
    model = build_tiny_llama(tmp_path / "model")
    for args in (["-o", tmp_path / "plain"], ["--fnuz", "-o", tmp_path / "fnuz"]):
        with pytest.raises(SystemExit) as exit_:
            main(["quantize", str(model), "-s", scheme, "-q", *map(str, args)])
        assert exit_.value.code in (0, None)
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(tmp_path / "plain"), "--op", "fnuz", "-q", "-o", str(tmp_path / "converted")])
    assert exit_.value.code in (0, None)
    plain, fnuz, converted = (_tensors(tmp_path / n) for n in ("plain", "fnuz", "converted"))
    layers = [n.removesuffix(".weight_scale") for n in plain if n.endswith(".weight_scale")]
    assert len(layers) == 14
    for layer in layers:
        weight, scale = vllm_normalize(plain[f"{layer}.weight"], plain[f"{layer}.weight_scale"])[:2]
        for out in (fnuz, converted):
            assert torch.equal(out[f"{layer}.weight"].view(torch.uint8), weight.view(torch.uint8)), layer
            assert torch.equal(out[f"{layer}.weight_scale"], scale), layer
