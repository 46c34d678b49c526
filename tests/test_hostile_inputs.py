"""Values and files that used to crash (a traceback, exit 1 or 3) and must be one line and exit 2 (issue 20), and
files the reference safetensors reader accepts that inspect must show rather than crash on.

Each case asserts the exit code, exactly one ``error:`` line on stderr naming the culprit, nothing written at or
beside the target, and the input's bytes unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli, tree_digest

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def rtn4(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rtn4") / "rtn4"
    assert run_cli("quantize", tiny_llama, "-s", "rtn4", "-o", out, "-q").code == 0
    return out


def edited(source: Path, folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of a one-shard checkpoint with its tensors edited."""
    shutil.copytree(source, folder)
    (shard,) = folder.glob("*.safetensors")
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return folder


def refused(args: list[str | Path], model: Path, outs: Path, needles: tuple[str, ...], code: int = 2) -> None:
    outs.mkdir(exist_ok=True)
    before, beside = tree_digest(model), sorted(os.listdir(outs))
    result = run_cli(*args)
    assert result.code == code, (result.code, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr_lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert tree_digest(model) == before, "the input changed"
    assert sorted(os.listdir(outs)) == beside, "something was written at or beside the target"


# ---------------------------------------------------------------- --device and --tokens

DEVICES = ["cuda:٣", "cuda:99999999999999999999", "cuda:abc", "cuda:-1", "cpu:0", "cuda:1_0", "cuda: 1", "gpu"]


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_device(device: str, tiny_llama: Path, tmp_path: Path) -> None:
    refused(["quantize", tiny_llama, "-o", tmp_path / "outs" / "o", "--device", device], tiny_llama,
            tmp_path / "outs", ("--device", repr(device)))


@pytest.mark.parametrize("device", ["cuda:٣", "cuda:99999999999999999999"])
def test_convert_device(device: str, rtn4: Path, tmp_path: Path) -> None:
    refused(["convert", rtn4, "--op", "dequantize", "-o", tmp_path / "outs" / "o", "--device", device], rtn4,
            tmp_path / "outs", ("--device", repr(device)))


@pytest.mark.parametrize("device", ["cuda:abc", "cuda:٣", "cuda:99999999999999999999", "cuda:", "cpu:0"])
def test_verify_device(device: str, rtn4: Path, tmp_path: Path) -> None:
    refused(["verify", rtn4, "--device", device], rtn4, tmp_path / "outs", ("--device", repr(device)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message for a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda:127", "cuda:128", "cuda:999999999"])
def test_large_gpu_index_without_a_gpu(device: str, tiny_llama: Path, rtn4: Path, tmp_path: Path) -> None:
    """torch.device wraps indices over 127 (cuda:999 is cuda:-25): refused before it is built."""
    refused(["quantize", tiny_llama, "-o", tmp_path / "outs" / "o", "--device", device], tiny_llama,
            tmp_path / "outs", (device, "no CUDA GPU"))
    refused(["verify", rtn4, "--device", device], rtn4, tmp_path / "outs", (device, "no CUDA GPU"))


def test_large_gpu_index_is_compared_with_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from qconvert.engine import resolve_device
    from qconvert.errors import BadInputError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(BadInputError, match="torch sees 2 CUDA GPU"):
        resolve_device("cuda:999")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("tokens", ["1000000000000", "65537", "١٦", "0", "-1", "1_000", "", "16,x"])
def test_verify_tokens(tokens: str, rtn4: Path, tmp_path: Path) -> None:
    refused(["verify", rtn4, "--device", "cpu", "--tokens", tokens], rtn4, tmp_path / "outs",
            ("--tokens", repr(tokens)))


@pytest.mark.parametrize("device", ["cuda:٣", "cuda:99999999999999999999", "cuda:abc", "cuda:-1"])
def test_early_cuda_ignores_what_the_command_refuses(device: str) -> None:
    from qconvert import early_cuda

    assert early_cuda.gpu_ordinal(["quantize", "m", "--device", device]) is None


def test_early_cuda_thread_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver call that raises (ctypes refusing an index as a C int) must not print a thread's traceback."""
    import ctypes

    from qconvert import early_cuda

    calls = []

    class Driver:
        def cuInit(self, flags: int) -> int:
            return 0

        def cuDeviceGet(self, device: object, ordinal: int) -> int:
            calls.append(ordinal)
            raise ctypes.ArgumentError("argument 2: OverflowError: int too long to convert")

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Driver())
    early_cuda._retain_primary_context(2**70)
    assert calls == [2**70]  # the fault fired, and was swallowed


def test_early_cuda_process_without_traceback(tiny_llama: Path, tmp_path: Path) -> None:
    """The real command: the early-CUDA thread starts at import, before the CLI parses anything."""
    result = run_cli("quantize", tiny_llama, "-o", tmp_path / "o", "--device", "cuda:99999999999999999999",
                     process=True)
    assert result.code == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr_lines) == 1 and "99999999999999999999" in result.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- damaged quantized layers

def _scale_one_column(t: dict) -> None:
    t[f"{Q}.weight_scale"] = t[f"{Q}.weight_scale"][:, :1].contiguous()


def _scale_3x5(t: dict) -> None:
    t[f"{Q}.weight_scale"] = torch.ones(3, 5, dtype=torch.bfloat16)


def _scale_transposed(t: dict) -> None:
    t[f"{Q}.weight_scale"] = t[f"{Q}.weight_scale"].t().contiguous()


def _scale_scalar(t: dict) -> None:
    t[f"{Q}.weight_scale"] = torch.ones((), dtype=torch.bfloat16)


def _packed_f32(t: dict) -> None:
    t[f"{Q}.weight_packed"] = t[f"{Q}.weight_packed"].float()


DAMAGE = {"scale [out, 1] under g128": (_scale_one_column, "weight_scale"),
          "scale [3, 5]": (_scale_3x5, "weight_scale"),
          "scale transposed": (_scale_transposed, "weight_scale"),
          "scale a scalar": (_scale_scalar, "weight_scale"),
          "weight_packed F32": (_packed_f32, "weight_packed is F32")}
ON_DAMAGED = {"verify": ["verify", "{m}", "--device", "cpu", "--tokens", "1"],
              "dequantize": ["convert", "{m}", "--op", "dequantize", "-o", "{o}", "-q"],
              "allow-requantize": ["quantize", "{m}", "-s", "fp8", "--allow-requantize", "-o", "{o}", "-q"],
              "inspect": ["inspect", "{m}"]}


@pytest.mark.parametrize("command", list(ON_DAMAGED))
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_quantized_layer(damage: str, command: str, rtn4: Path, tmp_path: Path) -> None:
    edit, needle = DAMAGE[damage]
    model = edited(rtn4, tmp_path / "model", edit)
    args = [str(a).format(m=model, o=tmp_path / "outs" / "o") for a in ON_DAMAGED[command]]
    refused(args, model, tmp_path / "outs", (Q, needle))


# ---------------------------------------------------------------- files the reference reader accepts

def _empty_tensor(folder: Path) -> None:
    save_file({"model.layers.0.mlp.up_proj.weight": torch.empty(0, 64, dtype=torch.bfloat16)},
              folder / "model.safetensors")


def _no_tensors(folder: Path) -> None:
    save_file({}, folder / "model.safetensors")


@pytest.mark.parametrize("as_file", [False, True])
@pytest.mark.parametrize("make", [_empty_tensor, _no_tensors])
@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_shows_empty_files(make: Callable[[Path], None], as_file: bool, as_json: bool,
                                   tmp_path: Path) -> None:
    from safetensors import safe_open

    folder = tmp_path / "model"
    folder.mkdir()
    make(folder)
    with safe_open(folder / "model.safetensors", "pt") as f:  # the reference reader accepts it
        names = list(f.keys())
    before = tree_digest(folder)
    result = run_cli("inspect", folder / "model.safetensors" if as_file else folder, *(["--json"] if as_json else []))
    assert result.code == 0 and result.stderr == "", result.stderr
    if as_json:
        report = json.loads(result.stdout)
        assert report["totals"]["tensors"] == len(names) and report["totals"]["bytes"] == 0
    else:
        assert "0 B stored" in result.stdout
    assert tree_digest(folder) == before


def test_header_over_the_limit_names_the_limit(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    size = 100_000_001
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", size))
        f.truncate(8 + size)  # sparse: the size is what matters, and it is checked before the header is read
    for args in (["inspect", folder], ["inspect", folder / "model.safetensors"],
                 ["quantize", folder, "-o", tmp_path / "outs" / "o"]):
        refused(args, folder, tmp_path / "outs", (f"header is {size} bytes", "100000000"))


# ---------------------------------------------------------------- names that are not UTF-8

def test_output_name_not_utf8(tiny_llama: Path, rtn4: Path, tmp_path: Path) -> None:
    outs = tmp_path / "outs"
    bad = os.fsdecode(os.fsencode(outs) + b"/out\xff")
    refused(["quantize", tiny_llama, "-s", "fp8", "-o", bad], tiny_llama, outs, ("not valid UTF-8", "\\xff"))
    refused(["convert", rtn4, "--op", "dequantize", "-o", bad], rtn4, outs, ("not valid UTF-8", "\\xff"))
    jobs = tmp_path / "jobs.yaml"
    jobs.write_bytes(b"jobs:\n  - model: " + os.fsencode(tiny_llama) + b"\n    scheme: fp8\n    output: "
                     + os.fsencode(bad) + b"\n")
    result = run_cli("batch", jobs)
    assert result.code == 2 and "Traceback" not in result.stderr, result.stderr
    assert os.listdir(outs) == []


def test_model_name_not_utf8_is_read(tiny_llama: Path, tmp_path: Path) -> None:
    """Legal on Linux, and nothing about it is written anywhere but the summary: it is read like any other."""
    model = Path(os.fsdecode(os.fsencode(tmp_path) + b"/m\xff"))
    shutil.copytree(tiny_llama, model)
    before = tree_digest(model)
    result = run_cli("quantize", model, "-s", "fp8", "-o", tmp_path / "out", "-q", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["input"] == str(model)
    assert run_cli("inspect", model).code == 0
    assert tree_digest(model) == before


# ---------------------------------------------------------------- config values

@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu"])
@pytest.mark.parametrize("command", ["quantize", "convert", "inspect", "verify"])
def test_fp8_model_dtype(dtype: str, command: str, deepseek_fp8: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(deepseek_fp8, tmp_path / "model"))
    config = json.loads((model / "config.json").read_text())
    key = "torch_dtype" if "torch_dtype" in config else "dtype"
    config[key] = dtype
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "outs" / "o"
    args = {"quantize": ["quantize", model, "-s", "fp8-block", "-o", out],
            "convert": ["convert", model, "--op", "dequantize", "-o", out],
            "inspect": ["inspect", model], "verify": ["verify", model, "--device", "cpu"]}[command]
    refused(args, model, tmp_path / "outs", ("config.json", key, repr(dtype)))
