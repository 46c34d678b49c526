"""Run safety across real processes: signals (SIGKILL then --resume, SIGHUP, SIGINT), two runs at once,
dead runs' leftovers, a full disk and a bind-mount alias of the input (the last two as root only)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qconvert import writing
from tests.conftest import build_linear_shards, run_python
from tests.test_hostile import run_main, snapshot

REPO = Path(__file__).resolve().parent.parent
ROOT = os.geteuid() == 0


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 34 MB of bf16 linear weights in four shards: long enough to be interrupted mid-way."""
    folder = build_linear_shards(tmp_path_factory.mktemp("proc") / "model", 1024)
    (folder / "README.md").write_text("readme\n")
    return folder


def _start(*args: str | Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("QCONVERT_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "qconvert", *map(str, args)], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)


def _wait_for(pattern: str, folder: Path, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Wait until ``pattern`` exists in ``folder``; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while not list(folder.glob(pattern)):
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)
    return True


def _wait_for_journal(folder: Path, proc: subprocess.Popen, shards: int, timeout: float = 120) -> bool:
    """Wait until the run's journal lists ``shards`` finished shards; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, "timed out"
        for journal in folder.glob(f".*.partial/{writing.JOURNAL_NAME}"):
            try:
                if len(json.loads(journal.read_text())["shards"]) >= shards:
                    return True
            except (OSError, ValueError, KeyError):
                pass
        time.sleep(0.002)
    return False


def _catches(pid: int, signum: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(mask & (1 << (signum - 1)))


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


ARGS = ("--scheme", "rtn8", "--max-shard-size", "1MB", "-q")


@pytest.fixture(scope="module")
def reference(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("ref") / "out"
    code, _, stderr = run_main(["quantize", str(model), "-o", str(out), *ARGS])
    assert code == 0, stderr
    assert len(list(out.glob("*.safetensors"))) >= 8
    return _tree(out)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_byte_identical(model: Path, reference: dict[str, str],
                                                                  tmp_path: Path) -> None:
    rng = random.Random(12)
    before = snapshot(model)
    reused_any = False
    for trial in range(3):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        out = folder / "out"
        proc = _start("quantize", model, "-o", out, *ARGS)
        # The first trial kills as soon as one shard is journaled, so that at least one resume has a finished
        # shard to reuse however fast the machine is; the others at random moments.
        if _wait_for_journal(folder, proc, 1 if trial == 0 else rng.randint(1, 12)):
            if trial:
                time.sleep(rng.uniform(0, 0.2))
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=120)
        if out.exists():  # it finished before the kill landed: nothing to resume
            assert _tree(out) == reference
            continue
        assert list(folder.glob(".out.qconvert-*.partial")), "a killed run leaves its partial for --resume"
        resumed = _start("quantize", model, "-o", out, *ARGS[:-1], "--resume")
        _, stderr = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, stderr
        reused_any |= "reusing" in stderr
        assert _tree(out) == reference
        assert sorted(p.name for p in folder.iterdir()) == ["out"], "leftovers beside the output"
    assert reused_any, "no trial reused a finished shard"
    assert snapshot(model) == before


def test_without_resume_a_dead_runs_partial_is_removed(model: Path, reference: dict[str, str],
                                                       tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _start("quantize", model, "-o", out, *ARGS)
    assert _wait_for(".out.qconvert-*.partial/model-00001-*", tmp_path, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    code, _, stderr = run_main(["quantize", str(model), "-o", str(out), *ARGS[:-1]])
    assert code == 0, stderr
    assert "removed" in stderr and "died" in stderr
    assert _tree(out) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# SIGTERM in make test; SIGHUP and SIGINT take the same path, in make slow.
@pytest.mark.parametrize("signum", [pytest.param(signal.SIGHUP, marks=pytest.mark.slow),
                                    pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGTERM])
def test_signal_mid_run_leaves_nothing(model: Path, tmp_path: Path, signum: int) -> None:
    out = tmp_path / "out"
    proc = _start("quantize", model, "-o", out, *ARGS)
    assert _wait_for(".out.qconvert-*.partial/model-00001-*", tmp_path, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert _lines(stderr) == ["error: interrupted; no output was left behind"], stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3])
def test_early_ctrl_c_prints_one_line(model: Path, tmp_path: Path, delay: float) -> None:
    """Ctrl-C while qconvert is still importing its libraries: one line, no traceback, nothing written.
    Timed from the moment qconvert's first line has run (its SIGHUP handler shows in /proc): before
    that the interpreter itself is starting (site imports), which no program can handle."""
    proc = _start("quantize", model, "-o", tmp_path / "out", *ARGS)
    deadline = time.monotonic() + 60
    while not _catches(proc.pid, signal.SIGHUP):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode in (1, 130) or proc.returncode == -signal.SIGINT, (proc.returncode, stderr)
    assert "Traceback" not in stderr and len(_lines(stderr)) <= 1, stderr
    assert list(tmp_path.iterdir()) == []


def test_second_concurrent_run_fails_fast(model: Path, reference: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _start("quantize", model, "-o", out, *ARGS)
    assert _wait_for(".out.qconvert.lock", tmp_path, first)
    started = time.monotonic()
    code, _, stderr = run_main(["quantize", str(model), "-o", str(out), *ARGS])
    assert code == 2 and len(_lines(stderr)) == 1 and "another qconvert run" in stderr, stderr
    assert time.monotonic() - started < 5
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert _tree(out) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_dead_owners_are_removed_live_ones_kept(model: Path, tmp_path: Path) -> None:
    """A partial made by PID 1 with another start time (a container's earlier run) is dead; one made
    by a live process is not touched; one from another host is left with a notice."""
    me = writing.OWNER
    dead_container = writing.Owner(me.host, me.boot, 1, 999_999_999)
    rebooted = writing.Owner(me.host, "0000dead", me.pid, me.start)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        live = writing.Owner(me.host, me.boot, sleeper.pid, writing._start_ticks(sleeper.pid) or 0)
        foreign = writing.Owner("otherhost", "abcd1234", 42, 42)
        for owner in (dead_container, rebooted, live, foreign):
            (tmp_path / f".out.qconvert-{owner.token}.partial").mkdir()
        code, _, stderr = run_main(["quantize", str(model), "-o", str(tmp_path / "out"), "--scheme", "rtn8"])
        assert code == 0, stderr
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(["out", f".out.qconvert-{live.token}.partial",
                               f".out.qconvert-{foreign.token}.partial"]), left
        assert stderr.count("died") == 2 and "another host" in stderr
    finally:
        sleeper.kill()
        sleeper.wait()


def test_resume_with_other_options_starts_over(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = writing.Owner(writing.OWNER.host, writing.OWNER.boot, 1, 999_999_998)
    partial = tmp_path / f".out.qconvert-{dead.token}.partial"
    partial.mkdir()
    (partial / writing.JOURNAL_NAME).write_text('{"fingerprint": "other job", "shards": {}}')
    code, _, stderr = run_main(["quantize", str(model), "-o", str(out), "--scheme", "rtn8", "--resume"])
    assert code == 0, stderr
    assert "different job" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_corrupted_finished_shard_is_rewritten_on_resume(model: Path, reference: dict[str, str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A journaled shard whose bytes changed since (bit rot, a stray edit) is not trusted."""
    out = tmp_path / "out"
    with monkeypatch.context() as patch:  # a run that dies just before its rename, leaving its partial
        def crash(_self: object) -> None:
            raise RuntimeError("simulated crash")
        patch.setattr(writing.OutputFolder, "commit", crash)
        patch.setattr(writing.OutputFolder, "__exit__", lambda *_: None)
        code, _, stderr = run_main(["quantize", str(model), "-o", str(out), *ARGS])
    assert code == 1 and "simulated crash" in stderr
    [partial] = tmp_path.glob(".out.qconvert-*.partial")
    dead = writing.Owner(writing.OWNER.host, writing.OWNER.boot, 1, 999_999_997)
    partial = partial.rename(tmp_path / f".out.qconvert-{dead.token}.partial")
    victim = sorted(partial.glob("*.safetensors"))[1]
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    code, _, stderr = run_main(["quantize", str(model), "-o", str(out), *ARGS[:-1], "--resume"])
    assert code == 0, stderr
    assert f"{victim.name} does not match its journal" in stderr and "reusing" in stderr
    assert _tree(out) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------- root only: mounts


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.mark.skipif(not ROOT, reason="mounting a small tmpfs needs root")
def test_full_disk_is_refused_up_front_with_the_figures(model: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk))
    try:
        code, _, stderr = run_main(["quantize", str(model), "-o", str(disk / "out"), "--scheme", "rtn8"])
        assert code == 2 and len(_lines(stderr)) == 1, stderr
        assert "needs" in stderr and "free" in stderr and "MB" in stderr
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.skipif(not ROOT, reason="mounting a small tmpfs needs root")
def test_disk_filling_mid_run_names_the_output(model: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The up-front check passes (the free space was misreported, or another writer took it): the write
    fails with ENOSPC, and the line names the output; nothing is left."""
    import shutil
    from collections import namedtuple

    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10**12, 0, 10**12))
    try:
        code, _, stderr = run_main(["quantize", str(model), "-o", str(disk / "out"), "--scheme", "rtn8"])
        assert code == 1 and len(_lines(stderr)) == 1, stderr
        assert str(disk / "out") in stderr and "disk filled up" in stderr
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.skipif(not ROOT, reason="bind mounts need root")
def test_bind_mount_alias_of_the_input_is_never_removed(model: Path, tmp_path: Path) -> None:
    before = snapshot(model)
    alias = tmp_path / "alias"
    alias.mkdir()
    _mount("--bind", str(model), str(alias))
    parent_alias = tmp_path / "parent-alias"
    parent_alias.mkdir()
    _mount("--bind", str(model.parent), str(parent_alias))
    holder = tmp_path / "old-output"
    (holder / "inner").mkdir(parents=True)
    (holder / "old.txt").write_text("old")
    _mount("--bind", str(model.parent), str(holder / "inner"))
    try:
        for target in (alias, alias / "q", parent_alias, holder):
            code, _, stderr = run_main(["quantize", str(model), "-o", str(target), "--overwrite"])
            assert code == 2 and len(_lines(stderr)) == 1, (target, stderr)
            assert "input" in stderr
        assert snapshot(model) == before
    finally:
        for place in (holder / "inner", parent_alias, alias):
            subprocess.run(["umount", str(place)], check=False)


@pytest.mark.skipif(not ROOT, reason="mounting needs root")
def test_output_onto_a_mount_point_is_filled_in_place(model: Path, reference: dict[str, str], tmp_path: Path) -> None:
    """A real mount point (a container volume) cannot be renamed onto: the output is written in a hidden
    folder inside it and moved in file by file; with --overwrite, an old output there is replaced."""
    target = tmp_path / "out"
    target.mkdir()
    _mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(target))
    try:
        code, _, stderr = run_main(["quantize", str(model), "-o", str(target), *ARGS])
        assert code == 0, stderr
        assert _tree(target) == reference and sorted(os.listdir(tmp_path)) == ["out"]
        (target / "stale.txt").write_text("old")
        code, _, stderr = run_main(["quantize", str(model), "-o", str(target), *ARGS])
        assert code == 2 and len(_lines(stderr)) == 1 and "not empty" in stderr, stderr
        code, _, stderr = run_main(["quantize", str(model), "-o", str(target), *ARGS, "--overwrite"])
        assert code == 0, stderr
        assert _tree(target) == reference and os.path.ismount(target)
    finally:
        subprocess.run(["umount", str(target)], check=True)


# ---------------------------------------------------------------- truthful interrupt messages, verify exit codes


def test_ctrl_c_while_overwrite_removes_the_old_output_says_so(model: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The new output is already in place when the old one is being removed: the message says that, and
    names what is left to delete, instead of claiming nothing was left behind."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_rmtree = writing.shutil.rmtree

    def interrupted_rmtree(path: object, *args: object, **kwargs: object) -> None:
        if str(path).endswith(".old"):
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(writing.shutil, "rmtree", interrupted_rmtree)
    code, _, stderr = run_main(["quantize", str(model), "-o", str(out), "--scheme", "rtn8", "--overwrite", "-q"])
    monkeypatch.undo()
    assert code == 1
    [line] = _lines(stderr)
    [old] = tmp_path.glob(".out.qconvert-*.old")
    assert "new output is complete" in line and str(old) in line, line
    assert (out / "config.json").is_file() and (old / "old.txt").is_file()


def test_verify_internal_error_exits_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import qconvert.verification

    def crash(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("checker bug")

    monkeypatch.setattr(qconvert.verification, "verify", crash)
    code, _, stderr = run_main(["verify", str(tmp_path), "--device", "cpu"])
    assert code == 3 and len(_lines(stderr)) == 1 and "checker bug" in stderr, stderr


def test_verify_device_cpu_works_from_a_fresh_command_line(tiny_llama: Path, tmp_path: Path) -> None:
    """No TRITON_INTERPRET in the environment (the test suite's conftest sets it; a user's shell does not).
    One small layer: the interpreter's time grows with the layer."""
    out = tmp_path / "out"
    code, _, stderr = run_main(["quantize", str(tiny_llama), "-o", str(out), "--scheme", "rtn8", "-q",
                                "--targets", "model.layers.0.mlp.down_proj"])
    assert code == 0, stderr
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "QCONVERT_DEBUG")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "qconvert", "verify", str(out), "--device", "cpu", "--tokens", "1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1/1 layers pass" in proc.stdout


# ---------------------------------------------------------------- how the command's process ends


def _python(code: str) -> subprocess.CompletedProcess:
    return run_python("-c", code)


def test_the_command_pauses_gc_while_importing_and_restores_it() -> None:
    """In the command's process the collector is off during imports and back on once main runs; a
    program that imports qconvert keeps its own setting."""
    done = _python("import sys, gc; sys.argv = ['qconvert', '--version']\n"
                   "import qconvert; paused = not gc.isenabled()\n"
                   "from qconvert import cli\n"
                   "try:\n    cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
                   "print(paused, gc.isenabled(), qconvert.AS_COMMAND)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-3:] == ["True", "True", "True"]
    library = _python("import gc, qconvert; print(gc.isenabled(), qconvert.AS_COMMAND)")
    assert library.stdout.split() == ["True", "False"], library.stderr


def test_leaving_flushes_runs_atexit_and_keeps_the_exit_code() -> None:
    """``cli._leave`` skips the interpreter's teardown, not the output, the atexit handlers or the code."""
    done = _python("import atexit, sys\n"
                   "from qconvert import cli\n"
                   "atexit.register(lambda: print('atexit ran'))\n"
                   "print('buffered', end=' '); sys.stderr.write('err')\n"
                   "cli._leave(3)")
    assert done.returncode == 3
    assert done.stdout == "buffered atexit ran\n" and done.stderr == "err"


def test_leaving_waits_for_a_running_thread() -> None:
    """A thread still running (none should be) gets the ordinary exit, which waits for it."""
    done = _python("import threading, time\n"
                   "from qconvert import cli\n"
                   "threading.Thread(target=lambda: (time.sleep(0.5), print('thread finished'))).start()\n"
                   "cli._leave(0)")
    assert done.returncode == 0 and done.stdout == "thread finished\n", done.stderr


def test_the_command_process_prints_its_whole_json_and_exits_0(model: Path, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    result = run_cli("quantize", model, "-o", tmp_path / "out", "--json", process=True)
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["output"] == str(tmp_path / "out")
    assert "Exception" not in result.stderr
