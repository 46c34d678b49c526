"""Embedding fidelity of a quantized sentence-transformers model against its original.

The quantized model is loaded by transformers through the compressed-tensors library, which rebuilds
(dequantizes) the weights itself: the figure checks our files, not our own dequantization code.
Needs the test extras (sentence-transformers, compressed-tensors):

    python -m qconvert.fidelity ORIGINAL_DIR QUANTIZED_DIR
"""

from __future__ import annotations

import sys

SENTENCES = [
    "The cat sits on the mat.",
    "A man is playing a guitar on stage.",
    "Quantization reduces the memory footprint of neural networks.",
    "Paris is the capital and most populous city of France.",
    "The stock market fell sharply after the announcement.",
    "She baked a chocolate cake for her daughter's birthday.",
    "Photosynthesis converts light energy into chemical energy.",
    "How do I reset my password?",
    "The train to Berlin leaves at half past seven.",
    "Rain is expected throughout the weekend in the north.",
    "He scored the winning goal in the final minute.",
    "Large language models are trained on huge text corpora.",
    "The museum is closed on Mondays.",
    "Please turn off the lights when you leave the room.",
    "A recipe for vegetable soup with lentils and carrots.",
    "The spacecraft entered orbit around Jupiter last night.",
]


def embedding_fidelity(original: str, quantized: str, sentences: list[str] | None = None) -> float:
    """Mean cosine similarity between the two models' sentence embeddings (1.0 is identical)."""
    import json
    from pathlib import Path

    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import CompressedTensorsConfig

    sentences = sentences or SENTENCES
    reference = SentenceTransformer(original, device="cpu")
    quantized_config = json.loads((Path(quantized) / "config.json").read_text()).get("quantization_config")
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if quantized_config else {}
    candidate = SentenceTransformer(quantized, device="cpu", model_kwargs=kwargs)
    a = reference.encode(sentences, convert_to_tensor=True)
    b = candidate.encode(sentences, convert_to_tensor=True)
    return float(torch.nn.functional.cosine_similarity(a, b).mean())


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python -m qconvert.fidelity ORIGINAL_DIR QUANTIZED_DIR")
    import warnings

    from transformers.utils import logging

    # Loading chatter (progress bars, the quantization_config override notice) is not the result.
    warnings.filterwarnings("ignore")
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    score = embedding_fidelity(sys.argv[1], sys.argv[2])
    print(f"mean cosine similarity of {len(SENTENCES)} sentence embeddings vs the original: {score:.5f}")


if __name__ == "__main__":
    main()
