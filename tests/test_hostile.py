"""The hostile-input corpus (tests/hostile_cases.py), run in-process through the real CLI entry point.

Every case asserts: the exit code; exactly one line on stderr for a failure (and for a success only the
one notice it expects, or nothing under ``-q``); nothing at the target or beside it after a failure (and
only the target after a success); the input unchanged, byte for byte; and for a success, an output that
the reference safetensors reader opens and transformers loads through compressed-tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qconvert.cli import main
from tests.hostile_cases import ALL_CASES, Case, Ctx


def run_main(args: list[str]) -> tuple[int, str, str]:
    """``qconvert ARGS`` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
    return code, out.getvalue(), err.getvalue()


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed, special files never opened): content hashes of
    regular files, link targets, and the kind of anything else."""
    found: dict[str, str] = {}
    if not os.path.lexists(root):
        return found
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                found[rel] = "link:" + os.readlink(path)
            elif stat.S_ISREG(mode):
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISDIR(mode):
                found[rel] = "dir"
            else:
                found[rel] = f"special:{stat.S_IFMT(mode)}"
        dirs[:] = [d for d in dirs if not (Path(folder) / d).is_symlink()]
    return found


def build_tiny(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=False, torch_dtype="bfloat16")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, max_shard_size="150KB")
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("copied too\n")
    assert len(list(folder.glob("model-*.safetensors"))) == 3
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("hostile") / "tiny")


def check_output(case: Case, target: Path) -> None:
    shards = sorted(target.glob("*.safetensors"))
    assert shards, sorted(p.name for p in target.iterdir())
    names: set[str] = set()
    for shard in shards:
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                f.get_tensor(name)
                names.add(name)
    index = target / "model.safetensors.index.json"
    if index.exists():
        assert set(json.loads(index.read_text())["weight_map"]) == names
    for name in case.tensors:
        assert name in names, name
    for rel in case.copied:
        assert (target / rel).is_file(), rel
    for rel in case.not_copied:
        assert not os.path.lexists(target / rel), rel
    assert not list(target.rglob(".qconvert*")), "journal left in the output"
    if case.load:
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig

        config = json.loads((target / "config.json").read_text())
        extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if "quantization_config" in config \
            else {}
        model = AutoModelForCausalLM.from_pretrained(target, **extra)
        assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_hostile(case: Case, tiny: Path, tmp_path: Path) -> None:
    scratch = tmp_path
    model = Path(shutil.copytree(tiny, scratch / "model", symlinks=True))
    outs = scratch / "outs"
    outs.mkdir()
    ctx = Ctx(model, outs / "out", scratch)
    args = case.setup(ctx)
    # -q keeps informational notes (e.g. where an output loads) out of the line count (inspect has no notes).
    if not case.notice and args and args[0] in ("quantize", "convert"):
        args.append("-q")
    input_before = snapshot(ctx.model)
    outs_before = snapshot(outs)
    scratch_before = set(os.listdir(scratch))
    target = ctx.target

    code, _stdout, stderr = run_main(args)

    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == case.code, (code, stderr)
    assert "Traceback" not in stderr
    if case.code != 0:
        assert len(lines) == 1, lines
        assert lines[0].startswith("error: "), lines
    elif case.notice:
        assert len(lines) == 1 and lines[0].startswith("note: "), lines
    else:
        assert lines == [], lines
    for needle in case.needles:
        assert needle in lines[0], (needle, lines[0])
    assert snapshot(ctx.model) == input_before, "the input changed"
    leftovers = [p for p in _listing(target.parent) if "qconvert" in p]
    assert leftovers == [], leftovers
    if case.code == 0:
        check_output(case, target)
        def others(tree: dict[str, str]) -> dict[str, str]:
            return {k: v for k, v in tree.items() if k.split("/")[0] != target.name}
        assert others(snapshot(outs)) == others(outs_before), "something was left beside the target"
    else:
        assert snapshot(outs) == outs_before, "something was left at or beside the target"
        assert set(os.listdir(scratch)) == scratch_before


def _listing(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def test_corpus_size() -> None:
    assert len(ALL_CASES) >= 150
    assert len({c.id for c in ALL_CASES}) == len(ALL_CASES)


# ---------------------------------------------------------------- differential: our reader vs the reference

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors import SafetensorError  # noqa: E402

from qconvert.errors import BadInputError  # noqa: E402
from qconvert.safetensors_io import REFERENCE_BITS, read_header  # noqa: E402

_DIMS = st.one_of(st.integers(0, 9), st.sampled_from([2**32, 2**63, 2**64 - 1, 2**64, -1, 1.0, True, "3"]))
_DTYPES = st.sampled_from([*REFERENCE_BITS, "Q9", "bf16", 5])


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A header and data built consistently, then perhaps broken in one of the ways files break."""
    count = draw(st.integers(0, 4))
    names = draw(st.lists(st.text(st.sampled_from("ab.\n_é"), min_size=0, max_size=3), min_size=count,
                          max_size=count, unique=True))
    header: dict[str, object] = {}
    position = 0
    for name in names:
        dtype = draw(_DTYPES)
        shape = draw(st.lists(_DIMS, max_size=3) if draw(st.booleans()) else
                     st.lists(st.integers(0, 5), max_size=3))
        try:
            numel = 1
            for dim in shape:
                numel *= int(dim)
            size = max(0, numel) * REFERENCE_BITS.get(dtype, 8) // 8
        except (TypeError, ValueError):
            size = 1
        size = min(size, 64)
        begin, end = position, position + size
        twist = draw(st.sampled_from(["none"] * 12 + ["gap", "shift", "swap", "short", "long", "three", "float"]))
        if twist == "gap":
            begin, end = begin + 1, end + 1
        elif twist == "shift":
            begin, end = begin - 1, end - 1
        elif twist == "swap":
            begin, end = end, begin
        elif twist == "short":
            end -= 1
        elif twist == "long":
            end += 1
        offsets: object = [begin, end]
        if twist == "three":
            offsets = [begin, end, end]
        elif twist == "float":
            offsets = [float(begin), end]
        entry: dict[str, object] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if draw(st.integers(0, 9)) == 0:
            entry.pop(draw(st.sampled_from(list(entry))))
        if draw(st.integers(0, 9)) == 0:
            entry["extra"] = draw(st.sampled_from([1, None, [], {"k": "v"}]))
        header[name] = entry
        position = max(position, end if isinstance(end, int) else position)
    metadata = draw(st.sampled_from(["absent", "null", "ok", "int", "string", "list", "nested"]))
    if metadata != "absent":
        header["__metadata__"] = {"null": None, "ok": {"format": "pt"}, "int": {"format": 1}, "string": "pt",
                                  "list": ["pt"], "nested": {"a": {"b": "c"}}}[metadata]
    data_len = max(0, position + draw(st.sampled_from([0] * 8 + [-1, 1, 8])))
    text = json.dumps(header)
    if draw(st.integers(0, 7)) == 0:
        text = " " + text + "\n"
    return text.encode(), bytes(data_len)


def _verdicts(path: Path, header: bytes, data: bytes) -> tuple[bool, bool, str]:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    try:
        with safe_open(path, "pt"):
            reference = True
    except (SafetensorError, OSError, ValueError):
        reference = False
    try:
        read_header(path)
        ours, why = True, ""
    except BadInputError as exc:
        # A dtype torch cannot hold is refused after the structural checks passed: structurally accepted.
        ours, why = "qconvert cannot handle" in str(exc), str(exc)
    return reference, ours, why


_DUPLICATE = re.compile(r'"([^"\\]*)": \{')


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=headers())
def test_reader_verdict_equals_the_reference(case: tuple[bytes, bytes], tmp_path: Path) -> None:
    header, data = case
    reference, ours, why = _verdicts(tmp_path / "x.safetensors", header, data)
    assert ours == reference, (header, len(data), reference, why)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(
    ['"', "{", "}", "[", "]", ",", ":", "0", "1", "-", "e", ".", " ", "\\", "x", "n", "DEL", "DUP"])),
    min_size=1, max_size=3))
def test_mutated_header_verdict_equals_the_reference(edits: list[tuple[int, str]], tmp_path: Path) -> None:
    """Byte-level damage to a real header: JSON corner cases (numbers, escapes, nesting) judged alike."""
    text = json.dumps({"__metadata__": {"format": "pt"},
                       "a": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]},
                       "b": {"dtype": "I8", "shape": [4], "data_offsets": [12, 16]}})
    for at, what in edits:
        at %= len(text) + 1
        if what == "DEL":
            text = text[:at] + text[at + 1:]
        elif what == "DUP":
            text = text[:at] + text[at:at + 8] + text[at:]
        else:
            text = text[:at] + what + text[at:]
    header = text.encode()
    names = _DUPLICATE.findall(text)
    if len(names) != len(set(names)):
        return  # a tensor named twice: we refuse on purpose where the reference keeps the last (tested below)
    reference, ours, why = _verdicts(tmp_path / "x.safetensors", header, bytes(16))
    assert ours == reference, (text, reference, why)


def test_duplicate_name_is_refused_although_the_reference_keeps_the_last(tmp_path: Path) -> None:
    entry = '{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
    header = f'{{"a": {entry}, "a": {entry}}}'.encode()
    reference, ours, why = _verdicts(tmp_path / "x.safetensors", header, b"x")
    assert reference and not ours and "named twice" in why


def test_unreadable_extra_file_is_refused_before_any_output(tiny: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An extra file the user cannot read (EACCES: root reads everything, so the refusal is injected at
    ``os.open`` for that one path) fails up front with exit 2, not after the work with exit 1."""
    model = Path(shutil.copytree(tiny, tmp_path / "model"))
    (model / "private.txt").write_text("x")
    if os.geteuid() != 0:
        (model / "private.txt").chmod(0)
    else:
        real_open = os.open

        def refusing_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
            if str(path).endswith("private.txt"):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", refusing_open)
    before = snapshot(model)
    code, _, stderr = run_main(["quantize", str(model), "-o", str(tmp_path / "out")])
    monkeypatch.undo()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "private.txt" in lines[0] and "Permission denied" in lines[0], stderr
    assert not (tmp_path / "out").exists() and snapshot(model) == before
    assert sorted(os.listdir(tmp_path)) == ["model"]
