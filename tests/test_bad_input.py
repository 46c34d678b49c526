"""Every kind of bad input: exit code 2, one line naming the file or tensor, no traceback, no output
folder, and the input untouched."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import run_cli, tree_digest


def _first_shard(model: Path) -> Path:
    return sorted(model.glob("*.safetensors"))[0]


def _truncate(model: Path) -> str:
    shard = _first_shard(model)
    shard.write_bytes(shard.read_bytes()[:-100])
    return shard.name


def _garbage_header(model: Path) -> str:
    shard = _first_shard(model)
    raw = bytearray(shard.read_bytes())
    raw[8:16] = b"\x00garbage"
    shard.write_bytes(bytes(raw))
    return shard.name


def _huge_header_length(model: Path) -> str:
    shard = _first_shard(model)
    raw = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", 2**40) + raw[8:])
    return shard.name


def _index_names_missing_shard(model: Path) -> str:
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = "model-00099-of-00099.safetensors"
    index_path.write_text(json.dumps(index))
    return "model-00099-of-00099.safetensors"


def _index_names_missing_tensor(model: Path) -> str:
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.phantom.weight"] = index["weight_map"]["model.norm.weight"]
    index_path.write_text(json.dumps(index))
    return "model.layers.0.mlp.phantom.weight"


def _poison(value: float) -> Callable[[Path], str]:
    def damage(model: Path) -> str:
        # Rewrite the shard holding one projection with a single bad value in it (a later tensor,
        # so some output has already been written when the run fails).
        name = "model.layers.1.mlp.down_proj.weight"
        index = json.loads((model / "model.safetensors.index.json").read_text())
        shard = model / index["weight_map"][name]
        from safetensors import safe_open

        with safe_open(shard, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors[name][3, 7] = value
        save_file(tensors, shard, metadata={"format": "pt"})
        return name

    return damage


def _no_safetensors(model: Path) -> str:
    for shard in model.glob("*.safetensors"):
        shard.rename(shard.with_suffix(".bin"))
    (model / "model.safetensors.index.json").unlink()
    return "no *.safetensors"


def _bad_json_index(model: Path) -> str:
    (model / "model.safetensors.index.json").write_text("{not json")
    return "model.safetensors.index.json"


CASES = {
    "truncated shard": (_truncate, "truncated"),
    "corrupt header": (_garbage_header, "corrupt"),
    "header length beyond the file": (_huge_header_length, "truncated"),
    "index names a missing shard": (_index_names_missing_shard, "does not exist"),
    "index names a missing tensor": (_index_names_missing_tensor, "not in its shard"),
    "index is not JSON": (_bad_json_index, "not valid JSON"),
    "NaN in a weight": (_poison(float("nan")), "1 NaN"),
    "Inf in a weight": (_poison(float("inf")), "1 Inf"),
    "no safetensors": (_no_safetensors, "found"),
}


def _assert_clean_failure(result, *needles: str) -> None:
    assert result.code == 2, (result.code, result.stderr)
    assert len(result.stderr_lines) == 1, result.stderr
    line = result.stderr_lines[0]
    assert line.startswith("error: ") and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in line, line


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_checkpoint(case: str, tiny_llama_copy: Path, tmp_path: Path) -> None:
    damage, problem = CASES[case]
    named = damage(tiny_llama_copy)
    before = tree_digest(tiny_llama_copy)
    out = tmp_path / "out"
    result = run_cli("quantize", tiny_llama_copy, "-o", out)
    _assert_clean_failure(result, named, problem)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert tree_digest(tiny_llama_copy) == before


def test_missing_path(tmp_path: Path) -> None:
    result = run_cli("quantize", tmp_path / "nope", "-o", tmp_path / "out")
    _assert_clean_failure(result, "nope", "no such folder")
    assert not (tmp_path / "out").exists()


def test_unknown_scheme(tiny_llama: Path, tmp_path: Path) -> None:
    result = run_cli("quantize", tiny_llama, "--scheme", "rtn3", "-o", tmp_path / "out")
    _assert_clean_failure(result, "rtn3", "rtn4")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--ignore", "re:(unclosed"], "invalid regular expression"),
        (["--max-shard-size", "lots"], "--max-shard-size"),
        (["--group-size", "0"], "--group-size"),
        (["--no-such-option"], "No such option"),
    ],
)
def test_bad_options(tiny_llama: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    result = run_cli("quantize", tiny_llama, "-o", tmp_path / "out", *args)
    _assert_clean_failure(result, needle)
    assert not (tmp_path / "out").exists()


def test_requantizing_integer_weights_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    first = run_cli("quantize", tiny_llama, "-o", tmp_path / "q", "-q")
    assert first.code == 0
    again = run_cli("quantize", tmp_path / "q", "-s", "rtn8", "-o", tmp_path / "qq")
    _assert_clean_failure(again, "already quantized", "--allow-requantize")
    assert not (tmp_path / "qq").exists()


def test_debug_flag_shows_the_traceback(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    save_file({"w.weight": torch.ones(4, 128)}, model / "model.safetensors")
    shard = model / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    # A process: the traceback is the interpreter's, printed for the exception --debug lets through.
    result = run_cli("quantize", model, "-o", tmp_path / "out", "--debug", process=True)
    assert result.code != 0 and "Traceback" in result.stderr


def test_inspect_bad_input(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_clean_failure(run_cli("inspect", empty), "no *.safetensors")


def test_input_file_not_folder(tiny_llama: Path, tmp_path: Path) -> None:
    shard = tmp_path / "one.safetensors"
    shutil.copy(_first_shard(tiny_llama), shard)
    _assert_clean_failure(run_cli("quantize", shard, "-o", tmp_path / "out"), "not a folder")


def test_output_that_cannot_be_created(tiny_llama: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("quantize", tiny_llama, "-o", blocker / "out")
    _assert_clean_failure(result, str(blocker / "out"), "cannot create the output")
