"""SGLang conformance: every output kind qconvert writes, through SGLang 0.5.23's own config parsing, model
classes and weight loaders (see sglang_harness.py for exactly what runs and what is patched).

Run with the engine venv (``make engines``; tests/engines/setup_sglang.sh builds it). Without SGLang importable,
the module skips, so the default tier stays as it was.

Per case and GPU capability (75, 80, 89, 90): the scheme SGLang picks per layer kind; every tensor through the
real model's ``load_weights``, each parameter the picked methods created compared with the files on disk
(nothing left at its initial fill, nothing on disk dropped, no shape/dtype error); and the outcome against
``qconvert.serving`` (loaded at c  <=>  the table lists SGLang for the kind and family with min_capability <= c;
the picks equal the table's ``method`` / ``moe_method``).
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.engines import sglang_harness as harness

try:
    harness.import_sglang()
except Exception as exc:  # noqa: BLE001 (any import failure means: not this tier's environment)
    pytest.skip(f"SGLang {harness.VERSION} is not importable here ({type(exc).__name__}: {exc}); "
                "run tests/engines/setup_sglang.sh and use its python", allow_module_level=True)

from qconvert import serving  # noqa: E402
from qconvert.cli import main as qconvert_main  # noqa: E402

CAPABILITIES = (75, 80, 89, 90)
# Layer kinds whose pick is the table's linear `method` (lm_head stays unquantized; experts: `moe_method`).
NOT_LINEAR = {"lm_head", "experts"}


@dataclass(frozen=True)
class Case:
    kind: str  # output kind (qconvert.serving.output_kind)
    quantize: tuple[str, ...]  # qconvert quantize arguments
    convert: str | None = None  # then qconvert convert --op


CASES = [
    Case("rtn4", ("--scheme", "rtn4")),
    Case("rtn8", ("--scheme", "rtn8")),
    Case("int8-block", ("--scheme", "int8-block")),
    Case("w8a8-int8", ("--scheme", "w8a8-int8")),
    Case("fp8", ("--scheme", "fp8")),
    Case("fp8-block", ("--scheme", "fp8-block")),
    Case("fp8-tensor", ("--scheme", "fp8-tensor")),
    Case("int8-block@sglang", ("--scheme", "int8-block", "--layout", "sglang")),
    Case("w8a8-int8+pack", ("--scheme", "w8a8-int8"), "pack"),
    Case("int8-block+pack", ("--scheme", "int8-block"), "pack"),
    Case("fp8+fnuz", ("--scheme", "fp8"), "fnuz"),
    Case("fp8-block+fnuz", ("--scheme", "fp8-block"), "fnuz"),
    Case("fp8-tensor+fnuz", ("--scheme", "fp8-tensor"), "fnuz"),
    # Per-layer scales first (a --fuse pattern that matches nothing), then shared by the convert op.
    Case("fp8-tensor+shared-scale", ("--scheme", "fp8-tensor", "--fuse", "re:(?!)"), "shared-scale"),
    Case("fp8-block+dequantize", ("--scheme", "fp8-block"), "dequantize"),
    Case("mixed", ("--scheme", "fp8-block", "--override", "re:.*mlp.*=rtn4")),
    # An override to `none` leaves one quantized scheme: its kind is that scheme's.
    Case("fp8-block", ("--scheme", "fp8-block", "--override", "re:.*mlp.*=none")),
]
CASE_IDS = [f"{c.kind}{'-mlp-none' if 'none' in ' '.join(c.quantize) else ''}" for c in CASES]
FAMILIES = ("llama", "deepseek")

# Cases where SGLang and the table disagree because qconvert's output is wrong (being fixed on main):
# strict xfail with the engine's exact message. Keyed by (case id, family).
KNOWN_QCONVERT_DEFECTS: dict[tuple[str, str], str] = {}

RESULTS: list[harness.Result] = []


def _tiny_llama(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "llama")
    return root / "llama"


def _tiny_deepseek(root: Path) -> Path:
    """DeepSeek-V3-shaped: MLA with q/kv LoRA ranks, MoE with shared experts, one dense layer first; the
    router and rope fields real DeepSeek-V3 configs carry (SGLang's model class reads them)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV3Config(
        hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=512, q_lora_rank=128, kv_lora_rank=128,
        qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=128, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, moe_layer_freq=1,
        topk_method="noaux_tc", scoring_func="sigmoid", ep_size=1, max_position_embeddings=10240,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 256, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0})
    DeepseekV3ForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "deepseek")
    return root / "deepseek"


def _qconvert(*args: str | Path) -> tuple[int, str]:
    """Run the qconvert CLI in-process; (exit code, stderr)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            qconvert_main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
    return code, stderr.getvalue()


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {"llama": _tiny_llama(root), "deepseek": _tiny_deepseek(root)}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if RESULTS:
        print("\n" + harness.markdown_table(RESULTS))
        path = harness.write_report(RESULTS)
        print(f"wrote {path}")


def _build(case: Case, base: Path, out: Path) -> tuple[Path | None, str]:
    first = out / "q" if case.convert else out / "out"
    code, err = _qconvert("quantize", base, *case.quantize, "-o", first, "--quiet", "--overwrite")
    if code == 0 and case.convert:
        code, err = _qconvert("convert", first, "--op", case.convert, "-o", out / "out", "--quiet", "--overwrite")
    if code != 0:
        line = next((ln for ln in err.splitlines() if ln.startswith("error")), err.strip()[:200])
        return None, line
    return out / "out", ""


def _expected(kind: str, family: str, capability: int) -> serving.Serving | None:
    return serving.pick(kind, serving.Engine.SGLANG, capability, family)


def _disagreements(result: harness.Result) -> list[str]:
    expected = _expected(result.kind, result.family, result.capability)
    lines = []
    if result.loaded != (expected is not None):
        lines.append(f"sm{result.capability}: SGLang {'loaded' if result.loaded else 'did not load'} it, the "
                     f"table says {'it does' if expected else 'it does not'}"
                     + ("" if result.loaded else f" ({'; '.join(result.problems[:3])})"))
    if expected is not None and result.loaded:
        linear = "|".join(sorted({p for k, v in result.picks.items() if k not in NOT_LINEAR for p in v.split("|")}))
        if linear != expected.method:
            lines.append(f"sm{result.capability}: SGLang picked {linear} for linear layers, the table says "
                         f"{expected.method}")
        if "experts" in result.picks and result.picks["experts"] != expected.moe_method:
            lines.append(f"sm{result.capability}: SGLang picked {result.picks['experts']} for MoE experts, the "
                         f"table says {expected.moe_method}")
    return lines


PARAMS = [pytest.param(case, family, id=f"{family}-{cid}",
                       marks=[pytest.mark.xfail(strict=True, reason=KNOWN_QCONVERT_DEFECTS[(cid, family)])]
                       if (cid, family) in KNOWN_QCONVERT_DEFECTS else [])
          for family in FAMILIES for case, cid in zip(CASES, CASE_IDS)]


@pytest.mark.parametrize(("case", "family"), PARAMS)
def test_sglang_loads_as_the_table_says(case: Case, family: str, bases: dict[str, Path],
                                        tmp_path: Path) -> None:
    checkpoint, refusal = _build(case, bases[family], tmp_path)
    results = []
    for capability in CAPABILITIES:
        if checkpoint is None:
            result = harness.Result(harness.ENGINE, harness.VERSION, family, case.kind, capability,
                                    problems=[f"qconvert refused to write it: {refusal}"])
        else:
            result = harness.run_case(checkpoint, family, case.kind, capability)
        results.append(result)
    RESULTS.extend(results)
    for r in results:
        print(f"{family} {case.kind} sm{r.capability}: loaded={r.loaded} picks={json.dumps(r.picks)}")
        for problem in r.problems[:6]:
            print(f"    {problem}")
    problems = [line for r in results for line in _disagreements(r)]
    assert not problems, f"{family} {case.kind}:\n" + "\n".join(problems)


def test_loaded_means_every_parameter_matches_the_disk(bases: dict[str, Path], tmp_path: Path) -> None:
    """The check can fail: a checkpoint with one weight corrupted after writing is reported, by name."""
    from safetensors.torch import load_file, save_file

    checkpoint, _ = _build(Case("fp8-block", ("--scheme", "fp8-block")), bases["llama"], tmp_path)
    assert checkpoint is not None
    shard = next(checkpoint.glob("*.safetensors"))
    tensors = load_file(shard)
    name = "model.layers.1.mlp.down_proj.weight_scale"
    tensors[name] = tensors[name] * 2
    save_file(tensors, shard, metadata={"format": "pt"})
    result = harness.run_case(checkpoint, "llama", "fp8-block", 90)
    assert not result.loaded
    assert any(p.startswith("model.layers.1.mlp.down_proj.weight_scale ") and "differs" in p
               for p in result.problems), result.problems
