"""What the serving table and the engines' behaviour mean for the checkpoints we write (issue 10).

The engines themselves run in the conformance tier (tests/engines/, ``make engines``); these tests cover
qconvert's side: config fields as compressed-tensors / llm-compressor write them, fused layer names,
refusals of outputs an engine would load wrongly, notices, and ``serves_in`` from the table.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qconvert import serving
from qconvert.cli import main
from tests.conftest import REPO, assert_same_as_llm_compressor, read_config, run_llm_compressor


def run_inline(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """The CLI in this process (the process boundary is not what these tests are about)."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def as_deepseek(tiny_llama: Path, folder: Path) -> Path:
    """The tiny Llama with a DeepSeek-V3 architecture entry: the family the serving table keys on."""
    shutil.copytree(tiny_llama, folder)
    config = read_config(folder)
    config["architectures"] = ["DeepseekV3ForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_sglang_layout_refused_where_the_loader_drops_the_scales(tiny_llama: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_inline(capsys, "quantize", tiny_llama, "-s", "int8-block", "--layout", "sglang",
                              "-o", tmp_path / "out")
    assert code == 2 and not (tmp_path / "out").exists()
    (line,) = stderr_lines(err)
    assert "LlamaForCausalLM" in line and "weight_scale_inv" in line and "--force-layout" in line
    deepseek = as_deepseek(tiny_llama, tmp_path / "ds")
    code, out, err = run_inline(capsys, "quantize", deepseek, "-s", "int8-block", "--layout", "sglang",
                                "-o", tmp_path / "ds-out", "--json")
    assert code == 0, err
    engines = {e["engine"] for e in json.loads(out)["serves_in"]}
    assert engines == {"sglang", "qconvert"}


def test_int8_block_says_where_it_loads(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_inline(capsys, "quantize", tiny_llama, "-s", "int8-block", "-o", tmp_path / "out", "--json")
    assert code == 0, err
    notes = [line for line in stderr_lines(err) if "neither vLLM" in line]
    assert len(notes) == 1 and "transformers" in notes[0] and "--layout sglang" in notes[0]
    assert [e["engine"] for e in json.loads(out)["serves_in"]] == ["transformers", "qconvert"]


@pytest.mark.parametrize("scheme", ["rtn4", "w8a8-int8", "fp8-block"])
def test_serves_in_comes_from_the_table(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        scheme: str) -> None:
    code, out, err = run_inline(capsys, "quantize", tiny_llama, "-s", scheme, "-o", tmp_path / "o", "--dry-run",
                                "--json")
    assert code == 0, err
    assert not any("neither vLLM" in line for line in stderr_lines(err))
    expected = [s.to_json() for s in serving.serves_in([scheme])]
    assert json.loads(out)["serves_in"] == expected
    assert {"vllm", "sglang"} <= {e["engine"] for e in expected}


def test_mixed_serves_in_needs_every_kind(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_inline(capsys, "quantize", tiny_llama, "-s", "fp8-block", "--override", "re:.*mlp.*=rtn4",
                                "-o", tmp_path / "o", "--dry-run", "--json")
    assert code == 0, err
    by_engine = {e["engine"]: e for e in json.loads(out)["serves_in"]}
    # rtn4 needs sm80 in vLLM, fp8-block sm89: the mixed checkpoint needs the stricter of the two.
    assert by_engine["vllm"]["min_capability"] == 89
    assert "WNA16" in by_engine["vllm"]["method"] and "W8A8Fp8" in by_engine["vllm"]["method"]


def test_splitting_a_fused_layer_is_refused(tiny_llama: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_inline(capsys, "quantize", tiny_llama, "-s", "rtn8", "--override",
                              "model.layers.0.self_attn.q_proj=rtn4", "-o", tmp_path / "o")
    assert code == 2 and not (tmp_path / "o").exists()
    (line,) = stderr_lines(err)
    assert "qkv_proj" in line and "q_proj=rtn4" in line and "k_proj=rtn8" in line
    code, _, err = run_inline(capsys, "quantize", tiny_llama, "-s", "rtn8", "--ignore",
                              "model.layers.1.mlp.up_proj", "-o", tmp_path / "o")
    assert code == 2
    (line,) = stderr_lines(err)
    assert "gate_up_proj" in line and "up_proj=none" in line


def test_pack_refuses_dynamic_activations_and_blocks(tiny_llama: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    for scheme, expected in (("w8a8-int8", "W8A8"), ("int8-block", "W8A8")):
        source = tmp_path / scheme
        assert run_inline(capsys, "quantize", tiny_llama, "-s", scheme, "-o", source, "-q")[0] == 0
        code, _, err = run_inline(capsys, "convert", source, "--op", "pack", "-o", tmp_path / f"{scheme}-packed")
        assert code == 2 and not (tmp_path / f"{scheme}-packed").exists()
        (line,) = stderr_lines(err)
        assert "dynamically" in line and expected in line and "weight_packed" in line


def test_fnuz_outputs_are_marked_and_explained(tiny_llama: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_inline(capsys, "quantize", tiny_llama, "-s", "fp8", "--fnuz", "-o", tmp_path / "q", "--json")
    assert code == 0, err
    assert read_config(tmp_path / "q")["quantization_config"]["qconvert_fp8_format"] == "e4m3fnuz"
    assert any("normalize them to fnuz on ROCm themselves" in line for line in stderr_lines(err))
    assert [e["engine"] for e in json.loads(out)["serves_in"]] == ["qconvert"]
    assert run_inline(capsys, "quantize", tiny_llama, "-s", "fp8", "-o", tmp_path / "plain", "-q")[0] == 0
    assert "qconvert_fp8_format" not in read_config(tmp_path / "plain")["quantization_config"]
    code, _, err = run_inline(capsys, "convert", tmp_path / "plain", "--op", "fnuz", "-o", tmp_path / "c")
    assert code == 0, err
    assert read_config(tmp_path / "c")["quantization_config"]["qconvert_fp8_format"] == "e4m3fnuz"
    assert any("normalize them to fnuz on ROCm themselves" in line for line in stderr_lines(err))


def test_schemes_json_carries_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_inline(capsys, "schemes", "--json")
    assert code == 0
    data = json.loads(out)
    rows = {row["name"]: row for row in data["schemes"]}
    assert rows["rtn4"]["serves_in"]["llama"] == [s.to_json() for s in serving.serving_for("rtn4")]
    assert not any(e["engine"] in ("vllm", "sglang") for e in rows["int8-block"]["serves_in"]["llama"])
    assert "int8-block@sglang" in data["other_outputs"]


# llm-compressor's model_free_ptq presets that coincide with our schemes.
LLMC_PRESETS = {"rtn4": "W4A16", "rtn8": "W8A16", "w8a8-int8": "W8A8", "fp8": "FP8_DYNAMIC", "fp8-block": "FP8_BLOCK"}


def test_config_fields_equal_llm_compressor(tiny_llama: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Field by field, our quantization_config is llm-compressor's (0.14, model_free_ptq) for the same scheme,
    and the tensors are bit-identical."""
    run_llm_compressor(tiny_llama, {preset: tmp_path / f"llmc-{scheme}" for scheme, preset in LLMC_PRESETS.items()})
    for scheme in LLMC_PRESETS:
        ours_dir, theirs_dir = tmp_path / scheme, tmp_path / f"llmc-{scheme}"
        assert run_inline(capsys, "quantize", tiny_llama, "-s", scheme, "-o", ours_dir, "-q")[0] == 0
        assert_same_as_llm_compressor(ours_dir, theirs_dir, scheme)


def test_readme_table_is_the_serving_table() -> None:
    """The full serving table lives in docs/schemes.md (the README links to it)."""
    page = (REPO / "docs" / "schemes.md").read_text()
    assert serving.README_MARKERS[0] in page
    assert page == serving.readme_with_table(page), "run: python -m qconvert.serving docs/schemes.md"


def test_partial_blocks_are_not_served_by_the_engines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """vLLM refuses fp8-block layers that are not whole 128x128 blocks (tests/engines/test_vllm_architectures.py
    records its message); qconvert writes them correctly, says so, and leaves vLLM and SGLang out of serves_in."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=384, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "m")  # k/v: 64 rows
    code, out, err = run_inline(capsys, "quantize", tmp_path / "m", "-s", "fp8-block", "-o", tmp_path / "o", "--json")
    assert code == 0, err
    notes = [line for line in stderr_lines(err) if "not whole 128x128 blocks" in line]
    assert len(notes) == 1 and "k_proj [64, 256]" in notes[0]
    assert not {"vllm", "sglang"} & {e["engine"] for e in json.loads(out)["serves_in"]}
    code, out, err = run_inline(capsys, "quantize", tmp_path / "m", "-s", "fp8-block", "--override",
                                "re:.*self_attn.*=fp8", "-o", tmp_path / "o2", "--json")
    assert code == 0, err
    assert {"vllm", "sglang"} <= {e["engine"] for e in json.loads(out)["serves_in"]}
