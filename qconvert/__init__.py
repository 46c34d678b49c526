"""qconvert: stream LLM checkpoints into quantized compressed-tensors checkpoints."""

__version__ = "0.1.0"
