"""``qconvert batch``: job-file validation, one read for several schemes, reports, idempotent reruns.

Every output is compared byte for byte with what a single ``qconvert quantize`` run writes; the runs are
in-process (``qconvert.cli.main``) to keep the suite fast, which is the same code path as the console
script.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from qconvert import cli
from qconvert.batch import Settings, exit_code, load_jobs, run_job
from qconvert.errors import BadInputError
from qconvert.fanout import Output, write_outputs
from qconvert.fingerprint import FINGERPRINT_NAME
from qconvert.pipeline import QuantizeRequest, prepare_quantize
from qconvert.safetensors_io import TensorReader
from qconvert.schemes import get_scheme
from qconvert.writing import run_guard
from tests.conftest import CliResult, build_tiny_llama, tree_digest


def qconvert(capsys: pytest.CaptureFixture, *args: object) -> CliResult:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return CliResult(int(exit_info.value.code or 0), captured.out, captured.err)


def output_digest(folder: Path) -> dict[str, str]:
    """Every file of an output but batch's fingerprint record, by content."""
    return {name: digest for name, digest in tree_digest(folder).items() if name != FINGERPRINT_NAME}


def report_lines(path: Path) -> tuple[list[dict], dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert "summary" in lines[-1] and all("summary" not in line for line in lines[:-1])
    return lines[:-1], lines[-1]["summary"]


def by_output(rows: list[dict]) -> dict[str, dict]:
    return {Path(r["output"]).name: r for r in rows}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batch-models")
    llama = build_tiny_llama(root / "llama-a", max_shard_size="2MB", seed=1)
    assert len(list(llama.glob("*.safetensors"))) == 2
    small = build_tiny_llama(root / "llama-b", max_shard_size="20MB", seed=2)
    broken = Path(shutil.copytree(small, root / "broken"))
    shard = broken / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated: bad input
    return {"llama": llama, "small": small, "broken": broken, "minilm": minilm_dir}


MINILM = "all-MiniLM-L6-v2-w8a8-int8"  # {name} of the MiniLM package's folder "model": the model's own name

JOBS = """
defaults:
  output: "{out}/{{name}}-{{scheme}}"
  max-shard-size: 1MB
jobs:
  - model: {llama}
    schemes: [rtn4, fp8-block]
  - model: {broken}
    scheme: rtn8
  - model: {small}
    scheme: fp8-tensor
    max_shard_size: 5GB
  - model: {minilm}
    scheme: w8a8-int8
    ignore: ["re:.*pooler.*"]
"""


def write_jobs(folder: Path, models: dict[str, Path], text: str = JOBS) -> Path:
    out = folder / "out"
    path = folder / "jobs.yaml"
    path.write_text(text.format(out=out, **models))
    return path


def test_batch_report_bytes_rerun_and_force(models: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    before = {name: tree_digest(path) for name, path in models.items()}
    jobs = write_jobs(tmp_path, models)
    report = tmp_path / "report.jsonl"

    result = qconvert(capsys, "batch", jobs, "--report", report)
    assert result.code == 2, result.stderr  # the one failure is bad input
    rows, summary = report_lines(report)
    named = by_output(rows)
    assert set(named) == {"llama-a-rtn4", "llama-a-fp8-block", "broken-rtn8", "llama-b-fp8-tensor", MINILM}
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["model"] for r in failed] == [str(models["broken"])]
    assert failed[0]["exit_code"] == 2
    assert "truncated" in failed[0]["error"] and "model.safetensors" in failed[0]["error"]
    assert [line for line in result.stderr_lines if line.startswith("error:")] == [
        f"error: {models['broken']} rtn8: {failed[0]['error']}"]
    assert summary["ok"] == 4 and summary["failed"] == 1 and summary["skipped"] == 0 and summary["exit_code"] == 2
    for row in rows:
        assert set(row) >= {"model", "scheme", "output", "status", "exit_code", "error", "seconds", "bytes_in",
                            "bytes_out"}
        if row["status"] == "ok":
            assert row["error"] is None and row["exit_code"] == 0
            assert row["bytes_out"] == sum(p.stat().st_size for p in Path(row["output"]).rglob("*") if p.is_file())
            assert row["bytes_in"] > row["bytes_out"] > 0
            assert isinstance(row["serves_in"], list)  # copied from the quantize summary
    # one read for the two-scheme job: it read the model once, not once per output
    llama_rows = [r for r in rows if r["model"] == str(models["llama"])]
    assert llama_rows[0]["job_bytes_read"] < 1.01 * llama_rows[0]["bytes_in"]
    assert summary["bytes_in"] < sum(r["bytes_in"] for r in rows)
    assert not (tmp_path / "out" / "broken-rtn8").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary folder left

    # each output is byte for byte what `qconvert quantize` writes
    singles = tmp_path / "single"
    for row in rows:
        if row["status"] != "ok":
            continue
        extra = ["--max-shard-size", "5GB" if "fp8-tensor" in row["output"] else "1MB"]
        if row["output"].endswith(MINILM):
            extra += ["--ignore", "re:.*pooler.*"]
        target = singles / Path(row["output"]).name
        single = qconvert(capsys, "quantize", row["model"], "-s", row["scheme"], "-o", target, "-q", *extra)
        assert single.code == 0, single.stderr
        assert output_digest(Path(row["output"])) == output_digest(target), row["output"]
    assert len(list((tmp_path / "out" / "llama-a-rtn4").glob("*.safetensors"))) > 1  # sharded, with an index

    # a rerun skips every up-to-date output and touches none of them
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    again = qconvert(capsys, "batch", jobs, "--json")
    assert again.code == 2
    lines = [json.loads(line) for line in again.stdout.splitlines()]
    statuses = {Path(r["output"]).name: r["status"] for r in lines[:-1]}
    assert statuses == {name: ("failed" if name == "broken-rtn8" else "skipped") for name in named}
    assert all(r.get("reason") == "up to date" for r in lines[:-1] if r["status"] == "skipped")
    assert lines[-1]["summary"]["skipped"] == 4
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == stamps

    # a changed input (new mtime) and a damaged output are rebuilt; the rest stays skipped
    shard = next(models["small"].glob("*.safetensors"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    (tmp_path / "out" / "llama-a-rtn4" / "config.json").unlink()
    third = qconvert(capsys, "batch", jobs, "--json")
    statuses = {Path(r["output"]).name: r["status"] for r in map(json.loads, third.stdout.splitlines()[:-1])}
    assert statuses["llama-b-fp8-tensor"] == "ok" and statuses["llama-a-rtn4"] == "ok", third.stdout
    assert statuses["llama-a-fp8-block"] == "skipped" and statuses[MINILM] == "skipped"
    assert output_digest(tmp_path / "out" / "llama-a-rtn4") == output_digest(singles / "llama-a-rtn4")

    # --force rebuilds everything (two jobs at a time), with the same bytes
    forced = qconvert(capsys, "batch", jobs, "--force", "--jobs", "2", "--json", "--quiet")
    assert forced.code == 2 and forced.stderr == ""
    rows = [json.loads(line) for line in forced.stdout.splitlines()[:-1]]
    assert sorted(r["status"] for r in rows) == ["failed", "ok", "ok", "ok", "ok"]
    for row in rows:
        if row["status"] == "ok":
            assert output_digest(Path(row["output"])) == output_digest(singles / Path(row["output"]).name)
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns - 10**9))
    assert {name: tree_digest(path) for name, path in models.items()} == before  # inputs never written


def test_fail_fast_and_dry_run(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = """
jobs:
  - model: {broken}
    output: {out}/first
  - model: {small}
    output: {out}/second
"""
    jobs = write_jobs(tmp_path, models, text)
    result = qconvert(capsys, "batch", jobs, "--fail-fast", "--json")
    assert result.code == 2
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["status"] for r in rows[:-1]] == ["failed", "skipped"]
    assert "--fail-fast" in rows[1]["reason"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    jobs = write_jobs(tmp_path, models, text.replace("{broken}", "{llama}"))
    dry = qconvert(capsys, "batch", jobs, "--dry-run", "--json")
    assert dry.code == 0, dry.stderr
    rows = [json.loads(line) for line in dry.stdout.splitlines()]
    assert [r["status"] for r in rows[:-1]] == ["ok", "ok"] and all(r["dry_run"] for r in rows[:-1])
    assert rows[0]["bytes_out"] > 0 and rows[-1]["summary"]["dry_run"] is True
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # (the failed run's parent)


BAD_JOB_FILES = [
    ("jobs:\n  - model: {llama}\n    sheme: rtn4\n", "jobs[0] ({llama}), key 'sheme'"),
    ("jobs:\n  - model: {llama}\n    schemes: [rtn4, rtn5]\n", "jobs[0] ({llama}), key 'schemes'"),
    ("jobs:\n  - model: {llama}\n    scheme: nope\n", "jobs[0] ({llama}), key 'scheme'"),
    ("jobs:\n  - model: {small}\n  - model: {llama}\n    max-shard-size: lots\n",
     "jobs[1] ({llama}), key 'max_shard_size'"),
    ("jobs:\n  - model: {llama}\n    output: out/{{model}}\n", "jobs[0] ({llama}), key 'output'"),
    ("jobs:\n  - model: {llama}\n    output: out/x\n    schemes: [rtn4, rtn8]\n", "jobs[0] ({llama}), key 'output'"),
    ("jobs:\n  - model: {llama}\n    output: out/x\n  - model: {small}\n    output: out/x\n",
     "jobs[1] ({small}), key 'output'"),
    ("jobs:\n  - model: {llama}\n    scheme: fp8\n    group_size: 64\n", "jobs[0] ({llama}), key 'group_size'"),
    ("jobs:\n  - model: {llama}\n    group_size: many\n", "jobs[0] ({llama}), key 'group_size'"),
    ("jobs:\n  - model: {llama}\n    layout: weird\n", "jobs[0] ({llama}), key 'layout'"),
    ("jobs:\n  - model: {llama}\n    overwrite: please\n", "jobs[0] ({llama}), key 'overwrite'"),
    ("jobs:\n  - model: {llama}\n    override: ['no-equals-sign']\n", "jobs[0] ({llama}), key 'override'"),
    ("jobs:\n  - model: {llama}\n    fuse: ['(']\n", "jobs[0] ({llama}), key 'fuse'"),
    ("jobs:\n  - model: {llama}\n    dry-run: true\n", "jobs[0] ({llama}), key 'dry_run'"),
    ("jobs:\n  - model: {llama}\n    scheme: rtn4\n    schemes: [rtn8]\n", "jobs[0] ({llama}), key 'schemes'"),
    ("jobs:\n  - model: {llama}\n    output: {llama}/inside\n", "jobs[0] ({llama}), key 'output'"),
    ("defaults:\n  colour: red\njobs:\n  - model: {llama}\n", "defaults, key 'colour'"),
    ("defaults:\n  max_shard_size: lots\njobs:\n  - model: {llama}\n",
     "jobs[0] ({llama}), key 'max_shard_size' (from defaults)"),
    ("defaults:\n  scheme: rtn4\n  schemes: [rtn8]\njobs:\n  - model: {llama}\n", "defaults, key 'schemes'"),
    ("defaults:\n  model: {llama}\njobs:\n  - model: {llama}\n", "defaults, key 'model'"),
    ("jobs:\n  - scheme: rtn4\n", "jobs[0], key 'model'"),
    ("job:\n  - model: {llama}\n", "unknown top-level key 'job'"),
    ("jobs: []\n", "jobs: expected a non-empty list"),
    ("jobs:\n  - model: [unclosed\n", "not valid YAML at line"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_JOB_FILES, ids=[e for _, e in BAD_JOB_FILES])
def test_job_file_validation(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                             text: str, expected: str) -> None:
    # a valid job first: validation must refuse the file before doing any of its work
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(text.format(**models))
    result = qconvert(capsys, "batch", jobs, "--report", tmp_path / "report.jsonl")
    assert result.code == 2
    assert len(result.stderr_lines) == 1 and result.stderr_lines[0].startswith(f"error: {jobs}: ")
    assert expected.format(**models) in result.stderr_lines[0]
    assert "Traceback" not in result.stderr
    assert not list(Path.cwd().glob("out")) and not (models["llama"] / "inside").exists()
    assert not list(models["llama"].parent.glob("llama-a-*"))  # the default output of a valid job: not written


def test_defaults_take_dashes_or_underscores(models: dict[str, Path], tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(f"defaults:\n  max-shard-size: 2MB\n  allow_requantize: true\n  ignore: re:.*down_proj.*\n"
                    f"jobs:\n  - model: {models['llama']}\n    schemes: [rtn4, rtn8]\n"
                    f"    output: o/{{name}}/{{scheme}}\n")
    [job] = load_jobs(jobs, cli.quantize_option_specs())
    assert [o.target for o in job.outputs] == [(Path.cwd() / f"o/llama-a/{s}").resolve() for s in ("rtn4", "rtn8")]
    request = job.outputs[1].request
    assert request.max_shard_bytes == 2 * 10**6 and request.allow_requantize and request.ignore == ["re:.*down_proj.*"]
    assert request.scheme == get_scheme("rtn8")

    # schemes in defaults apply to every job that names none; a job's own scheme wins
    jobs.write_text(f"defaults:\n  schemes: [rtn4, fp8]\n  output: o/{{name}}-{{scheme}}\n"
                    f"jobs:\n  - model: {models['llama']}\n  - model: {models['small']}\n    scheme: rtn8\n")
    first, second = load_jobs(jobs, cli.quantize_option_specs())
    assert [o.scheme for o in first.outputs] == ["rtn4", "fp8"] and [o.scheme for o in second.outputs] == ["rtn8"]


def test_exit_codes() -> None:
    ok = {"status": "ok", "exit_code": 0}
    bad = {"status": "failed", "exit_code": 2}
    broken = {"status": "failed", "exit_code": 1}
    assert exit_code([ok, {"status": "skipped", "exit_code": 0}]) == 0
    assert exit_code([ok, bad, bad]) == 2
    assert exit_code([bad, broken]) == 1


def test_one_read_feeds_every_output(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     request: pytest.FixtureRequest) -> None:
    """Every input tensor is read once for a three-scheme job (copies included), and an output that fails
    midway is abandoned alone: the others are complete and byte-identical."""
    reads: list[str] = []
    original = TensorReader.read

    def counting(self: TensorReader, info: object) -> torch.Tensor:
        reads.append(info.name)  # type: ignore[attr-defined]
        return original(self, info)  # type: ignore[arg-type]

    guard = run_guard()  # prepare_quantize locks each target, as batch's run_job does inside one guard
    guard.__enter__()
    request.addfinalizer(lambda: guard.__exit__(None, None, None))
    prepared = [prepare_quantize(QuantizeRequest(str(models["llama"]), get_scheme(s), tmp_path / s,
                                                 show_progress=False), lambda _: None)
                for s in ("rtn4", "fp8-block", "w8a8-int8")]
    # the fp8-block output fails at its third quantized layer
    quantizing = [u for u in prepared[1].units if u.produce is not None]
    target = quantizing[2]

    def boom(_tensors: list[torch.Tensor]) -> dict:
        raise BadInputError("simulated failure in one output")

    target.produce = boom
    monkeypatch.setattr(TensorReader, "read", counting)
    outputs = [Output(p.checkpoint, p.units, p.target, p.config, 10**6) for p in prepared]
    read = write_outputs(outputs, lambda _: None)
    monkeypatch.undo()
    assert sorted(reads) == sorted(set(reads)) and set(reads) == set(prepared[0].checkpoint.tensors)
    # tensors once; the small copied files once per output that completed (the failed one stopped before)
    assert read == prepared[0].checkpoint.tensor_bytes + 2 * sum(
        (models["llama"] / rel).stat().st_size for rel in prepared[0].checkpoint.other_files)
    assert [type(o.error).__name__ if o.error else None for o in outputs] == [None, "BadInputError", None]
    guard.__exit__(None, None, None)  # the locks go with the run
    assert not (tmp_path / "fp8-block").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["rtn4", "w8a8-int8"]
    for scheme in ("rtn4", "w8a8-int8"):
        single = tmp_path / "single" / scheme
        cli_args = ["quantize", str(models["llama"]), "-s", scheme, "-o", str(single), "-q", "--max-shard-size", "1MB"]
        with pytest.raises(SystemExit) as done:
            cli.main(cli_args)
        assert done.value.code == 0
        assert output_digest(tmp_path / scheme) == output_digest(single)


def test_fingerprint_is_not_copied_by_later_runs(models: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    jobs = write_jobs(tmp_path, models, "jobs:\n  - model: {small}\n    output: {out}/first\n")
    [job] = load_jobs(jobs, cli.quantize_option_specs())
    [row] = run_job(job, Settings())
    assert row["status"] == "ok" and (tmp_path / "out" / "first" / FINGERPRINT_NAME).is_file()
    result = qconvert(capsys, "convert", tmp_path / "out" / "first", "--op", "dequantize", "-o", tmp_path / "deq", "-q")
    assert result.code == 0, result.stderr
    assert not (tmp_path / "deq" / FINGERPRINT_NAME).exists()
