"""The engines on llm-compressor's own microscaled checkpoints: the reference the tier's nvfp4 / mxfp4 / mxfp8 cases
are measured against, and a check of the harnesses on outputs qconvert did not write.

Two steps, in two environments (llm-compressor runs in the main one, the engines in their venvs):

    PYTHONPATH=.:tests/llmc_stubs python3 tests/engines/llmcompressor_reference.py build DIR
    PYTHONPATH=. $(bash tests/engines/setup_vllm.sh | tail -1) tests/engines/llmcompressor_reference.py vllm DIR
    PYTHONPATH=. $(bash tests/engines/setup_sglang.sh | tail -1) tests/engines/llmcompressor_reference.py sglang DIR

``build`` writes, for each engine's source models (``sources.py``: the tier's own), what llm-compressor's
``model_free_ptq`` writes for the presets NVFP4A16, MXFP4A16 and MXFP8A16 (``ignore``: lm_head, the embeddings and
the DeepSeek router, which model_free_ptq would otherwise quantize as any 2-D ``*.weight``; qconvert leaves them
too). ``vllm`` / ``sglang`` run the engine's harness on each at every capability of the tier and print one line per
run: loaded or not, the picks, the post-load comparison and the first problems.

Where llm-compressor leaves NVFP4 global scales unshared (DeepSeek's q_a_proj / kv_a_proj_with_mqa, shared and
routed experts' gate / up) the engines' post-load processing changes the weights (vLLM) or refuses (SGLang): what
qconvert's shared global scales are for.
"""

from __future__ import annotations

import sys
from pathlib import Path

PRESETS = {"nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16", "mxfp8": "MXFP8A16"}
IGNORE = ["lm_head", "re:.*embed_tokens$", "re:.*mlp\\.gate$"]


def build(root: Path) -> None:
    from llmcompressor import model_free_ptq

    from tests.engines import sources

    for engine, builder in (("vllm", sources.build_vllm_source), ("sglang", sources.build_sglang_source)):
        for family in sources.FAMILIES:
            source = root / engine / f"src-{family}"
            if not source.exists():
                builder(family, source)
            for kind, preset in PRESETS.items():
                out = root / engine / f"{kind}-{family}"
                if not out.exists():
                    model_free_ptq(str(source), str(out), scheme=preset, ignore=IGNORE, max_workers=1, device="cpu")


def run(engine: str, root: Path) -> None:
    if engine == "vllm":
        from tests.engines import vllm_harness as harness

        capabilities = harness.CAPABILITIES

        def case(folder: Path, family: str, kind: str, capability: int):
            return harness.run_case(folder, family, kind, capability, harness.model_config(folder))
    else:
        from tests.engines import sglang_harness as harness

        harness.import_sglang()
        capabilities = (75, 80, 89, 90)

        def case(folder: Path, family: str, kind: str, capability: int):
            return harness.run_case(folder, family, kind, capability)

    for folder in sorted((root / engine).glob("*-*")):
        kind, _, family = folder.name.partition("-")
        if kind not in PRESETS:
            continue
        for capability in capabilities:
            result = case(folder, family, f"llmcompressor:{kind}", capability)
            picks = sorted(set(result.picks.values()))
            print(f"{engine} {kind} {family} sm{capability}: loaded={result.loaded} picks={picks} "
                  f"postload={result.postload!r}")
            for problem in result.problems[:4]:
                print(f"    {problem}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("build", "vllm", "sglang"):
        sys.exit(__doc__)
    (build if sys.argv[1] == "build" else lambda root: run(sys.argv[1], root))(Path(sys.argv[2]))
