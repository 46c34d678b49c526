"""``qconvert batch --ray local``: the same jobs as Ray tasks on a local cluster started by the test give the
same report, exit code and bytes as a local run. One batch run (a Ray cluster takes a while to start)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import build_tiny_llama, run_cli
from tests.test_batch import output_digest

pytest.importorskip("ray", reason="Ray is not installed (pip install 'qconvert[ray]')")

JOBS = """
defaults:
  output: "{out}/{{name}}-{{scheme}}"
  max_shard_size: 1MB
jobs:
  - model: {llama}
    schemes: [rtn4, fp8-block]
  - model: {damaged}
    scheme: rtn8
  - model: {minilm}
    scheme: rtn4
"""

VARYING = {"seconds", "output", "notes"}  # time, and the output folder (each run writes its own)


def rows_of(stdout: str) -> tuple[list[dict], dict]:
    lines = [json.loads(line) for line in stdout.splitlines()]
    rows = sorted(lines[:-1], key=lambda r: (r["job"], r["scheme"]))
    return rows, lines[-1]["summary"]


@pytest.mark.slow
def test_ray_local_matches_local_run(tmp_path: Path, minilm_dir: Path) -> None:
    llama = build_tiny_llama(tmp_path / "llama", max_shard_size="2MB", seed=3)
    # A model whose last shard lost its tail: bad input found when its job is planned, a failed row in the report
    # (a missing model would refuse the whole batch up front, before any job runs).
    damaged = Path(shutil.copytree(llama, tmp_path / "damaged"))
    shard = sorted(damaged.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])
    runs = {}
    for mode in ("here", "ray"):
        jobs = tmp_path / f"jobs-{mode}.yaml"
        jobs.write_text(JOBS.format(out=tmp_path / mode, llama=llama, damaged=damaged, minilm=minilm_dir))
        args = ["batch", jobs, "--json", "--report", tmp_path / f"{mode}.jsonl"]
        result = run_cli(*args, *(["--ray", "local"] if mode == "ray" else []))
        assert result.code == 2, result.stderr  # the damaged model is bad input; the rest succeeds
        assert result.stdout == (tmp_path / f"{mode}.jsonl").read_text()
        runs[mode] = rows_of(result.stdout)
    (here_rows, here_summary), (ray_rows, ray_summary) = runs["here"], runs["ray"]
    assert [r["status"] for r in ray_rows] == ["ok", "ok", "failed", "ok"]
    assert [{k: v for k, v in r.items() if k not in VARYING} for r in ray_rows] == [
        {k: v for k, v in r.items() if k not in VARYING} for r in here_rows]
    assert {k: v for k, v in ray_summary.items() if k != "seconds"} == {
        k: v for k, v in here_summary.items() if k != "seconds"}
    for here, there in zip(here_rows, ray_rows, strict=True):
        assert Path(here["output"]).name == Path(there["output"]).name
        if here["status"] == "ok":
            assert output_digest(Path(here["output"])) == output_digest(Path(there["output"]))
