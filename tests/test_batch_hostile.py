"""``qconvert batch`` against a hostile corpus: every promise ``quantize`` makes, kept by batch too.

Each case builds a job file (and whatever damage it needs) around two small models, runs ``qconvert batch``
in-process, and asserts: the exit code, exactly one error line on stderr that names the problem and holds no
raw control character, nothing written at or beside any output (or report) of the file, and every input's
bytes unchanged. Refusals that concern the job file come before any job's work: jobs[0] is valid in most cases
and must not have been written either.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qconvert.batch import MAX_JOB_FILE_BYTES, MAX_JOB_FILE_DEPTH
from tests.conftest import build_tiny_llama, tree_digest
from tests.test_batch import qconvert

SHARD = "model.safetensors"
DOWN = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small single-shard Llama; each case copies it (a copy is a fresh input to check and to damage)."""
    return build_tiny_llama(tmp_path_factory.mktemp("hostile-batch") / "llama", max_shard_size="20MB", seed=3)


@dataclass
class Env:
    root: Path
    source: Path
    inputs: list[Path] = field(default_factory=list)
    targets: list[Path] = field(default_factory=list)  # every place the batch must not have written
    args: list[str] = field(default_factory=list)

    def model(self, name: str) -> Path:
        folder = Path(shutil.copytree(self.source, self.root / name))
        self.inputs.append(folder)
        return folder

    def out(self, name: str) -> Path:
        target = self.root / "out" / name
        self.targets.append(target)
        return target

    def jobs(self, text: str, name: str = "jobs.yaml") -> Path:
        path = self.root / name
        path.write_text(text)
        return path

    def two_jobs(self, second: str, first_output: str = "a-out") -> Path:
        """jobs[0] valid, jobs[1] with ``second`` (YAML lines of its keys, indented by 4)."""
        a, b = self.model("a"), self.model("b")
        return self.jobs(f"jobs:\n  - model: {a}\n    output: {self.out(first_output)}\n"
                         f"  - model: {b}\n    output: {self.out('b-out')}\n{second}")


@dataclass
class Case:
    id: str
    setup: Callable[[Env], Path]
    needles: tuple[str, ...]
    code: int = 2


def _stray_scale(env: Env, folder: Path) -> None:
    tensors = load_file(folder / SHARD)
    tensors[f"{DOWN}.weight_scale"] = torch.ones(tensors[f"{DOWN}.weight"].shape[0], 2, dtype=torch.bfloat16)
    save_file(tensors, folder / SHARD, metadata={"format": "pt"})


def _alias_bomb(env: Env) -> Path:
    a = env.model("a")
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    levels += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    return env.jobs("bomb:\n" + "".join(f"  {line}\n" for line in levels)
                    + f"jobs:\n  - model: {a}\n    output: {env.out('a-out')}\n    ignore: *i\n")


def _fifo(env: Env) -> Path:
    path = env.root / "jobs.fifo"
    os.mkfifo(path)
    return path


def _link_to(target: str) -> Callable[[Env], Path]:
    def setup(env: Env) -> Path:
        path = env.root / "jobs.yaml"
        path.symlink_to(target)
        return path
    return setup


def _deep(env: Env) -> Path:
    a = env.model("a")
    return env.jobs(f"jobs:\n  - model: {a}\n    output: {env.out('a-out')}\n    ignore: "
                    + "[" * 5000 + "]" * 5000 + "\n")


def _big(env: Env) -> Path:
    a = env.model("a")
    return env.jobs(f"jobs:\n  - model: {a}\n    output: {env.out('a-out')}\n" + "#" * MAX_JOB_FILE_BYTES + "\n")


def _report(where: Callable[[Env], Path]) -> Callable[[Env], Path]:
    """A valid two-job file, with ``--report`` at ``where``."""
    def setup(env: Env) -> Path:
        jobs = env.two_jobs("")
        report = where(env)
        env.args += ["--report", str(report)]
        if not report.exists():
            env.targets.append(report)
        return jobs
    return setup


def _bind_like(env: Env) -> Path:
    """Two spellings of one folder (a link to it): the second job's output is the first's."""
    a, b = env.model("a"), env.model("b")
    (env.root / "out").mkdir()
    (env.root / "elsewhere").symlink_to(env.root / "out")
    return env.jobs(f"jobs:\n  - model: {a}\n    output: {env.out('same')}\n"
                    f"  - model: {b}\n    output: {env.root / 'elsewhere' / 'same'}\n")


def _chain(exists: bool) -> Callable[[Env], Path]:
    def setup(env: Env) -> Path:
        a = env.model("a")
        first = env.out("first")
        if exists:  # the rerun: jobs[0]'s output is there from the last run (a copy of a model, as far as we care)
            shutil.copytree(a, first)
            env.inputs.append(first)
            env.targets.remove(first)
        return env.jobs(f"jobs:\n  - model: {a}\n    output: {first}\n"
                        f"  - model: {first}\n    output: {env.out('second')}\n")
    return setup


def _output_inside_other_input(env: Env) -> Path:
    a, b = env.model("a"), env.model("b")
    env.targets.append(a / "inside")
    return env.jobs(f"jobs:\n  - model: {a}\n    output: {env.out('a-out')}\n"
                    f"  - model: {b}\n    output: {a / 'inside'}\n")


def _output_holds_other_input(env: Env) -> Path:
    a = env.model("a")
    inner = env.root / "holder" / "m"
    shutil.copytree(env.source, inner)
    env.inputs.append(inner)  # the output it would replace (overwrite: true) holds this input: unchanged
    return env.jobs(f"jobs:\n  - model: {inner}\n    output: {env.out('m-out')}\n"
                    f"  - model: {a}\n    output: {env.root / 'holder'}\n    overwrite: true\n")


def _output_via_link_into_input(env: Env) -> Path:
    a, b = env.model("a"), env.model("b")
    (env.root / "door").symlink_to(a)
    env.targets.append(a / "x")
    return env.jobs(f"jobs:\n  - model: {a}\n    output: {env.out('a-out')}\n"
                    f"  - model: {b}\n    output: {env.root / 'door' / 'x'}\n")


def _existing_output(env: Env) -> Path:
    jobs = env.two_jobs("")
    keep = env.root / "out" / "b-out"
    keep.mkdir(parents=True)
    (keep / "precious.txt").write_text("mine")
    env.targets.remove(keep)
    env.inputs.append(keep)  # a folder batch did not write: untouched
    return jobs


def _output_is_file(env: Env) -> Path:
    jobs = env.two_jobs("")
    (env.root / "out").mkdir(exist_ok=True)
    (env.root / "out" / "b-out").write_text("a file")
    env.targets.remove(env.root / "out" / "b-out")
    return jobs


def _with_stray_scale(env: Env) -> Path:
    a = env.model("a")
    _stray_scale(env, a)
    return env.jobs(f"jobs:\n  - model: {a}\n    scheme: fp8\n    output: {env.out('a-fp8')}\n")


def _escaped_name(env: Env) -> Path:
    a = env.model("evil\x1b[31m\nname")
    _stray_scale(env, a)
    return env.jobs(f"jobs:\n  - model: {json.dumps(str(a))}\n    output: {env.out('a-out')}\n")


def _truncated(env: Env) -> Path:
    a = env.model("a")
    shard = a / SHARD
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return env.jobs(f"jobs:\n  - model: {a}\n    output: {env.out('a-out')}\n    resume: true\n")


def _overrides_fifo(env: Env) -> Path:
    os.mkfifo(env.root / "overrides.txt")
    return env.two_jobs(f"    overrides: {env.root / 'overrides.txt'}\n")


def _nested(env: Env) -> Path:
    a, b = env.model("a"), env.model("b")
    return env.jobs(f"jobs:\n  - model: {a}\n    output: {env.out('a-out')}\n"
                    f"  - model: {b}\n    output: {env.out('a-out') / 'b'}\n")


def _missing_model(env: Env) -> Path:
    return env.jobs(f"jobs:\n  - model: {env.model('a')}\n    output: {env.out('a-out')}\n"
                    f"  - model: {env.root / 'missing'}\n    output: {env.out('m-out')}\n")


def _not_utf8(env: Env) -> Path:
    path = env.root / "j.yaml"
    path.write_bytes(b"jobs: [\xff\xfe]\n")
    return path


def _second(key_lines: str) -> Callable[[Env], Path]:
    return lambda env: env.two_jobs(key_lines)


CASES = [
    # the job file itself: read with limits, one line naming it, nothing hangs
    Case("file: an alias bomb in an option value", _alias_bomb, ("jobs.yaml", "aliases")),
    Case("file: a merge key (an alias)", lambda env: env.jobs(
        f"defaults: &d\n  scheme: rtn4\njobs:\n  - <<: *d\n    model: {env.model('a')}\n"), ("aliases",)),
    Case("file: a Python object tag", lambda env: env.jobs(
        "jobs: !!python/object/apply:os.system ['touch pwned']\n"), ("jobs.yaml", "not valid YAML")),
    Case("file: a FIFO", _fifo, ("jobs.fifo", "not a regular file")),
    Case("file: /dev/zero", lambda env: Path("/dev/zero"), ("/dev/zero", "not a regular file")),
    Case("file: a link to /dev/zero", _link_to("/dev/zero"), ("jobs.yaml", "not a regular file")),
    Case("file: a folder", lambda env: env.root, ("{root}", "not a regular file")),
    Case("file: missing", lambda env: env.root / "nope.yaml", ("nope.yaml", "cannot read")),
    Case("file: nested 5000 deep", _deep, ("jobs.yaml", f"nested more than {MAX_JOB_FILE_DEPTH}")),
    Case("file: over the size cap", _big, ("jobs.yaml", f"{MAX_JOB_FILE_BYTES}")),
    Case("file: not UTF-8", _not_utf8, ("j.yaml", "not UTF-8")),
    Case("file: a control character in a key", lambda env: env.jobs(
        f"jobs:\n  - model: {env.model('a')}\n    \"col\\e[31mour\\n\": red\n"), ("col\\x1b[31mour\\n",)),
    # every option value of every job, before jobs[0] runs
    Case("jobs[1]: device tpu", _second("    device: tpu\n"), ("jobs[1]", "key 'device'", "tpu")),
    Case("jobs[1]: workers 0", _second("    workers: 0\n"), ("jobs[1]", "key 'workers'")),
    Case("jobs[1]: workers 10000", _second("    workers: 10000\n"), ("jobs[1]", "key 'workers'")),
    Case("jobs[1]: min_coverage 1.5", _second("    min_coverage: 1.5\n"), ("jobs[1]", "key 'min_coverage'")),
    Case("jobs[1]: min_coverage nan", _second("    min-coverage: nan\n"), ("jobs[1]", "key 'min_coverage'")),
    Case("jobs[1]: ignore regex", _second("    ignore: ['re:(']\n"), ("jobs[1]", "key 'ignore'", "regular expr")),
    Case("jobs[1]: targets regex", _second("    targets: ['re:[']\n"), ("jobs[1]", "key 'targets'")),
    Case("jobs[1]: override regex", _second("    override: ['re:(=rtn8']\n"), ("jobs[1]", "key 'override'")),
    Case("jobs[1]: empty ignore pattern", _second("    ignore: ['']\n"), ("jobs[1]", "key 'ignore'", "empty")),
    Case("jobs[1]: layout", _second("    layout: weird\n"), ("jobs[1]", "key 'layout'")),
    Case("jobs[1]: unknown scheme", _second("    scheme: rtn5\n"), ("jobs[1]", "key 'scheme'")),
    Case("jobs[1]: overrides file is a FIFO", _overrides_fifo, ("jobs[1]", "key 'overrides'", "not a regular")),
    Case("jobs[1]: resume is not a flag value", _second("    resume: maybe\n"), ("jobs[1]", "key 'resume'")),
    # every input and output place, before any work; compared by (device, inode)
    Case("places: output inside another job's input", _output_inside_other_input,
         ("jobs[1]", "key 'output'", "overlaps the input of jobs[0]")),
    Case("places: output holds another job's input", _output_holds_other_input,
         ("jobs[0]", "key 'model'", "inside the output of jobs[1]")),
    Case("places: output through a link into another job's input", _output_via_link_into_input,
         ("jobs[1]", "key 'output'", "overlaps the input")),
    Case("places: two jobs, one folder by two spellings", _bind_like,
         ("jobs[1]", "key 'output'", "is also written by jobs[0]")),
    Case("places: an output nested in another's", _nested,
         ("jobs[1]", "inside the output of jobs[0]")),
    Case("places: a chain (jobs[1] reads jobs[0]'s output)", _chain(False), ("jobs[1]", "chains are not supported")),
    Case("places: a chain on the rerun", _chain(True), ("jobs[1]", "chains are not supported")),
    Case("places: jobs[1]'s model is missing", _missing_model, ("jobs[1]", "no such folder")),
    Case("places: jobs[1]'s output is a folder batch did not write", _existing_output,
         ("jobs[1]", "exists and is not empty")),
    Case("places: jobs[1]'s output is a file", _output_is_file, ("jobs[1]", "not a folder")),
    Case("places: output is the input by another spelling", lambda env: env.jobs(
        f"jobs:\n  - model: {env.model('a')}\n    output: {env.root / 'a' / '.' }\n"), ("overlaps the input",)),
    # --report: an output like any other
    Case("report: onto the input's config.json", _report(lambda env: env.inputs[0] / "config.json"),
         ("--report", "inside the input")),
    Case("report: a new file inside an input", _report(lambda env: env.inputs[1] / "report.jsonl"),
         ("--report", "inside the input")),
    Case("report: onto the job file", _report(lambda env: env.root / "jobs.yaml"), ("--report", "job file")),
    Case("report: inside an output", _report(lambda env: env.root / "out" / "a-out" / "r.jsonl"),
         ("--report", "inside the output")),
    Case("report: a folder", _report(lambda env: env.root), ("--report", "not a regular file")),
    Case("report: /dev/full", _report(lambda env: Path("/dev/full")), ("--report", "not a regular file")),
    Case("report: under a file", _report(lambda env: env.inputs[0] / "config.json" / "r.jsonl"),
         ("--report", "inside the input")),
    # what quantize refuses in the input, batch refuses too (the shared prepare_quantize)
    Case("input: a stray weight_scale beside a bf16 weight", _with_stray_scale,
         ("down_proj.weight_scale", "twice")),
    Case("input: a hostile model name is escaped in the one line", _escaped_name, ("\\x1b[31m", "\\x0aname")),
    Case("input: a truncated shard (with resume)", _truncated, (SHARD, "truncated")),
]



@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_batch(case: Case, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    env = Env(tmp_path, model)
    jobs = case.setup(env)
    inputs = {path: tree_digest(path) for path in env.inputs}
    jobs_bytes = jobs.read_bytes() if jobs.is_file() and jobs.stat().st_size < 10**7 else None
    result = qconvert(capsys, "batch", jobs, *env.args)
    assert result.code == case.code, result.stderr
    lines = result.stderr.split("\n")
    assert len([line for line in lines if line]) == 1 and lines[0].startswith("error: "), result.stderr
    assert "\x1b" not in result.stderr and "Traceback" not in result.stderr
    for needle in case.needles:
        assert needle.format(root=tmp_path) in lines[0], (needle, lines[0])
    for target in env.targets:
        assert not os.path.lexists(target), target
        if target.parent.is_dir():
            beside = [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}")]
            assert not beside, beside
    assert {path: tree_digest(path) for path in env.inputs} == inputs
    if jobs_bytes is not None:
        assert jobs.read_bytes() == jobs_bytes


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


# ---------------------------------------------------------------------------------------------------
# Faults that need injecting (each asserts its fault fired), and the promises that are not refusals


def test_free_space_is_checked_for_all_outputs_at_once(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Each output alone fits, the two together do not: refused before either is written."""
    import qconvert.preflight as preflight
    from qconvert.pipeline import QuantizeRequest, prepare_quantize
    from qconvert.schemes import get_scheme

    env = Env(tmp_path, model)
    a = env.model("a")
    needed = [prepare_quantize(QuantizeRequest(str(a), get_scheme(s), tmp_path / "x", dry_run=True,
                                               show_progress=False), lambda _: None).needed_bytes
              for s in ("rtn8", "fp8")]
    free = max(needed) + (1 << 20) + min(needed) // 2
    asked: list[Path] = []

    def disk_usage(place: object) -> shutil._ntuple_diskusage:  # type: ignore[name-defined]
        asked.append(Path(str(place)))
        return shutil._ntuple_diskusage(10**12, 10**12 - free, free)  # type: ignore[attr-defined]

    monkeypatch.setattr(preflight.shutil, "disk_usage", disk_usage)
    jobs = env.jobs(f"jobs:\n  - model: {a}\n    schemes: [rtn8, fp8]\n    output: {tmp_path / 'out'}/{{scheme}}\n")
    result = qconvert(capsys, "batch", jobs)
    assert result.code == 2 and len(result.stderr_lines) == 1, result.stderr
    assert "other outputs of this batch" in result.stderr and asked
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_an_unreadable_file_to_copy_is_refused_before_writing(model: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import qconvert.preflight as preflight
    from qconvert.errors import BadInputError

    env = Env(tmp_path, model)
    a = env.model("a")
    refused: list[Path] = []
    original = preflight.open_regular

    def open_regular(path: Path) -> int:
        if path.name == "generation_config.json":
            refused.append(path)
            raise BadInputError(f"{path}: cannot open (Permission denied)")
        return original(path)

    monkeypatch.setattr(preflight, "open_regular", open_regular)
    jobs = env.jobs(f"jobs:\n  - model: {a}\n    output: {env.out('a-out')}\n")
    result = qconvert(capsys, "batch", jobs)
    assert refused and result.code == 2 and len(result.stderr_lines) == 1
    assert "generation_config.json: cannot open" in result.stderr
    parent = env.targets[0].parent  # (removed when the failed run made it: nothing left of the run at all)
    assert not env.targets[0].exists() and not (parent.exists() and [p for p in parent.iterdir()
                                                                       if p.name.startswith(".")])


def test_report_into_a_missing_folder_is_made_and_written_whole(model: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    env = Env(tmp_path, model)
    jobs = env.jobs(f"jobs:\n  - model: {env.model('a')}\n    output: {env.out('a-out')}\n")
    report = tmp_path / "reports" / "deep" / "r.jsonl"
    result = qconvert(capsys, "batch", jobs, "--report", report)
    assert result.code == 0, result.stderr
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert lines[0]["status"] == "ok" and lines[-1]["summary"]["ok"] == 1
    assert [p.name for p in report.parent.iterdir()] == ["r.jsonl"]  # no temporary file left


def test_a_full_disk_under_the_report_is_one_line(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import qconvert.batch as batch

    class Full:
        closed = False
        writes = 0

        def write(self, _text: str) -> int:
            Full.writes += 1
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self) -> None:
            pass

        def close(self) -> None:
            self.closed = True

    def fake_open(path: Path, mode: str) -> Full:
        Path(path).write_text("")  # the temporary file exists, as it would
        return Full()

    monkeypatch.setattr(batch, "open", fake_open, raising=False)
    env = Env(tmp_path, model)
    jobs = env.jobs(f"jobs:\n  - model: {env.model('a')}\n    output: {env.out('a-out')}\n")
    report = tmp_path / "r.jsonl"
    result = qconvert(capsys, "batch", jobs, "--report", report)
    assert Full.writes and result.code == 2 and len(result.stderr_lines) == 1, result.stderr
    assert "cannot write the report (No space left on device)" in result.stderr
    assert not report.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".r.jsonl")]


def test_resume_goes_through_quantizes_writer(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``resume: true`` is not ignored: the output is written by write_checkpoint with its journal, and its bytes
    are what quantize --resume writes; a rerun skips it as up to date."""
    import qconvert.pipeline as pipeline

    calls: list[bool] = []
    original = pipeline.write_checkpoint

    def spy(*args: object, **kwargs: object) -> list[str]:
        calls.append(bool(kwargs.get("resume")))
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "write_checkpoint", spy)
    env = Env(tmp_path, model)
    a = env.model("a")
    jobs = env.jobs(f"jobs:\n  - model: {a}\n    scheme: fp8-tensor\n    resume: true\n    output: {env.out('r')}\n")
    result = qconvert(capsys, "batch", jobs, "--json")
    assert result.code == 0, result.stderr
    assert calls == [True]
    single = qconvert(capsys, "quantize", a, "-s", "fp8-tensor", "-o", tmp_path / "single", "-q", "--resume")
    assert single.code == 0, single.stderr
    from qconvert.fingerprint import FINGERPRINT_NAME

    made = {k: v for k, v in tree_digest(env.targets[0]).items() if k != FINGERPRINT_NAME}
    assert made == tree_digest(tmp_path / "single")
    again = qconvert(capsys, "batch", jobs, "--json")
    assert json.loads(again.stdout.splitlines()[0])["status"] == "skipped" and calls == [True, True]  # batch, quantize
