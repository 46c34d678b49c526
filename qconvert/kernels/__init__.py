"""qconvert's GPU kernels (Triton), kept apart from the converter.

They run on any CUDA GPU Triton supports, and on the CPU under ``TRITON_INTERPRET=1`` (slowly: small
shapes only), which is how CI tests them. Importing this package imports Triton.
"""

from qconvert.kernels.fp8 import e4m3fnuz_to_e4m3fn, fp8_linear, rowwise_supported
from qconvert.kernels.gemm import scaled_gemm, scaled_gemm_quant
from qconvert.kernels.quant import (
    dequantize_activations,
    dequantize_weight_blocks,
    fake_quant_static_int8,
    gelu_requant,
    quantize_activations,
    quantize_weight_blocks,
)
from qconvert.kernels.weight_only import packed_gemm

__all__ = [
    "dequantize_activations",
    "dequantize_weight_blocks",
    "e4m3fnuz_to_e4m3fn",
    "fake_quant_static_int8",
    "fp8_linear",
    "gelu_requant",
    "packed_gemm",
    "quantize_activations",
    "quantize_weight_blocks",
    "rowwise_supported",
    "scaled_gemm",
    "scaled_gemm_quant",
]
