"""The output folder under attack: hostile leftovers for --resume (FIFOs, folders and links where files
belong, half-copied extra files, an input changed since), dead and live runs told apart by their lock
(not by /proc, whose PID and start time repeat across PID namespaces), an existing empty folder or
mount point filled in place, and the parent folders a failed run made.

Every case asserts the exit code; on failure one escaped stderr line and nothing new at or beside the
target; the input's bytes unchanged; on success, the output's bytes equal a fresh run's."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qconvert import pipeline, writing
from qconvert.fingerprint import FINGERPRINT_NAME
from tests.conftest import CliResult, run_cli, tree_digest
from tests.test_hostile import snapshot

ARGS = ("--scheme", "rtn8", "--max-shard-size", "100KB")


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """A case that would block (a FIFO opened) fails in 60 s instead of hanging the suite."""
    def fire(_signum: int, _frame: object) -> None:
        raise TimeoutError("the run blocked")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def control_free(text: str) -> bool:
    return not any(ord(c) < 32 or ord(c) == 127 for c in text)


def assert_refused(result: CliResult, code: int, needle: str, *, input_dir: Path, before_input: dict[str, str],
                   place: Path, before_place: dict[str, str]) -> str:
    """Exit ``code``, one escaped line holding ``needle``, the input and the folder around the target
    exactly as they were."""
    assert result.code == code, result.stderr
    assert len(result.stderr_lines) == 1, result.stderr
    [line] = result.stderr_lines
    assert needle in line and control_free(line), line
    assert tree_digest(input_dir) == before_input
    assert snapshot(place) == before_place, "something was left at or beside the target"
    return line


def assert_fresh(result: CliResult, out: Path, fresh: dict[str, str], input_dir: Path,
                 before_input: dict[str, str]) -> None:
    assert result.code == 0, result.stderr
    assert all(control_free(line) for line in result.stderr_lines)
    assert tree_digest(out) == fresh
    assert tree_digest(input_dir) == before_input
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "leftovers beside"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".qconvert")], "leftovers inside"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("outdir") / "model")


@pytest.fixture(scope="module")
def fresh(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("fresh") / "out"
    result = run_cli("quantize", model, "-o", out, *ARGS)
    assert result.code == 0, result.stderr
    assert len(list(out.glob("*.safetensors"))) > 2 and (out / "extra" / "notes.txt").is_file()
    return tree_digest(out)


def make_dead_partial(model: Path, place: Path, *args: str, command: str = "quantize") -> Path:
    """Run a job that dies just before its rename (as if SIGKILLed there), leaving its partial folder with
    every shard and copy journaled; its lock is released when the command ends."""
    with pytest.MonkeyPatch.context() as patch:
        def crash(_self: object) -> None:
            raise RuntimeError("simulated death before the rename")
        patch.setattr(writing.OutputFolder, "commit", crash)
        patch.setattr(writing.OutputFolder, "__exit__", lambda *_: None)
        result = run_cli(command, model, "-o", place / "out", *(args or ARGS))
    assert result.code == 1 and "simulated death" in result.stderr
    [partial] = place.glob(".out.qconvert-*.partial")
    return partial


@pytest.fixture(scope="module")
def template(model: Path, fresh: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The partial folder of a run that died just before its rename: every shard and copy journaled."""
    partial = make_dead_partial(model, tmp_path_factory.mktemp("template"))
    journal = json.loads((partial / writing.JOURNAL_NAME).read_text())
    assert len(journal["shards"]) == len([n for n in fresh if n.endswith(".safetensors")])
    assert sorted(journal["extras"]) == ["extra/notes.txt", "generation_config.json"]
    return partial


def dead_partial(template: Path, place: Path) -> Path:
    place.mkdir(exist_ok=True)
    return Path(shutil.copytree(template, place / template.name, symlinks=True))


def journal_of(partial: Path) -> dict:
    return json.loads((partial / writing.JOURNAL_NAME).read_text())


def edit_journal(partial: Path, edit: Callable[[dict], None]) -> None:
    journal = journal_of(partial)
    edit(journal)
    (partial / writing.JOURNAL_NAME).write_text(json.dumps(journal))


def first_shard(partial: Path) -> Path:
    return sorted(partial.glob("model-*.safetensors"))[0]


def resume(model: Path, out: Path, *extra: str) -> CliResult:
    return run_cli("quantize", model, "-o", out, *ARGS, "--resume", *extra)


# ---------------------------------------------------------------- --resume: what the journal proves


def test_resume_of_an_intact_partial_reuses_everything(model: Path, fresh: dict[str, str], template: Path,
                                                       tmp_path: Path) -> None:
    before = tree_digest(model)
    dead_partial(template, tmp_path)
    result = resume(model, tmp_path / "out")
    assert_fresh(result, tmp_path / "out", fresh, model, before)
    assert "reusing 16 of 16 shards" in result.stderr


def _replace_with(kind: str, path: Path) -> None:
    """Put a hostile non-regular entry where ``path`` was."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
        (path / "inside").write_text("x")
    elif kind == "symlink":
        path.symlink_to("/etc/hostname")
    elif kind == "socket":
        here = os.getcwd()
        os.chdir(path.parent)  # a socket's path is limited to 108 bytes: bind by its bare name
        try:
            server = socket.socket(socket.AF_UNIX)
            server.bind(path.name)
            server.close()
        finally:
            os.chdir(here)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(("victim", "kind", "needle"), [
    (writing.JOURNAL_NAME, "fifo", "is a FIFO"),
    (writing.JOURNAL_NAME, "symlink", "is a symbolic link"),
    (writing.JOURNAL_NAME, "folder", "is a folder"),
    ("SHARD", "folder", "a folder where qconvert writes a file"),
    ("SHARD", "fifo", "is a FIFO"),
    ("SHARD", "symlink", "is a symbolic link"),
    ("SHARD", "socket", "is a socket"),
    ("config.json", "fifo", "is a FIFO"),
    ("generation_config.json", "symlink", "is a symbolic link"),
    ("extra", "fifo", "is a FIFO"),
    ("extra/notes.txt", "fifo", "is a FIFO"),
    ("extra/notes.txt", "folder", "a folder where qconvert writes a file"),
    (writing.OWNER_LOCK, "fifo", "not a regular file"),
    ("stray-fifo", "fifo", "is a FIFO"),
])
def test_resume_refuses_what_is_not_a_regular_file(model: Path, template: Path, tmp_path: Path, victim: str,
                                                   kind: str, needle: str) -> None:
    """Never opened (a FIFO would hang the run, a link would be written through): one line naming it."""
    partial = dead_partial(template, tmp_path)
    path = first_shard(partial) if victim == "SHARD" else partial / victim
    _replace_with(kind, path)
    before_input, before_place = tree_digest(model), snapshot(tmp_path)
    line = assert_refused(resume(model, tmp_path / "out"), 2, needle, input_dir=model, before_input=before_input,
                          place=tmp_path, before_place=before_place)
    assert str(path) in line and "--resume" in line


def test_resume_refuses_a_hostile_name_on_one_escaped_line(model: Path, template: Path, tmp_path: Path) -> None:
    partial = dead_partial(template, tmp_path)
    os.mkfifo(partial / "evil\nname\x1b[31m")
    before_input, before_place = tree_digest(model), snapshot(tmp_path)
    line = assert_refused(resume(model, tmp_path / "out"), 2, "is a FIFO", input_dir=model, before_input=before_input,
                          place=tmp_path, before_place=before_place)
    assert "evil\\x0aname\\x1b[31m" in line, line


def test_resume_refuses_a_partial_that_is_a_link(model: Path, template: Path, tmp_path: Path) -> None:
    elsewhere = dead_partial(template, tmp_path / "elsewhere")
    (tmp_path / template.name).symlink_to(elsewhere)
    before_input, before_place = tree_digest(model), snapshot(tmp_path)
    assert_refused(resume(model, tmp_path / "out"), 2, "is a symbolic link, not a folder", input_dir=model,
                   before_input=before_input, place=tmp_path, before_place=before_place)


def test_a_shard_linked_into_the_input_is_never_written_through(model: Path, tmp_path: Path,
                                                                template: Path) -> None:
    victim_input = tmp_path / "victim-model"
    shutil.copytree(model, victim_input)
    partial = dead_partial(template, tmp_path)
    shard = first_shard(partial)
    shard.unlink()
    shard.symlink_to(sorted(victim_input.glob("*.safetensors"))[0])
    before_victim = tree_digest(victim_input)
    before_input, before_place = tree_digest(model), snapshot(tmp_path)
    assert_refused(resume(model, tmp_path / "out"), 2, "symbolic link", input_dir=model, before_input=before_input,
                   place=tmp_path, before_place=before_place)
    assert tree_digest(victim_input) == before_victim


def test_without_resume_a_hostile_dead_partial_is_just_removed(model: Path, fresh: dict[str, str], template: Path,
                                                               tmp_path: Path) -> None:
    partial = dead_partial(template, tmp_path)
    _replace_with("fifo", partial / writing.JOURNAL_NAME)
    _replace_with("symlink", first_shard(partial))
    before = tree_digest(model)
    result = run_cli("quantize", model, "-o", tmp_path / "out", *ARGS)
    assert_fresh(result, tmp_path / "out", fresh, model, before)
    assert "that died" in result.stderr and not partial.exists()


@pytest.mark.parametrize("damage", ["truncated-unjournaled", "changed-journaled", "missing", "journal-lost"])
def test_half_copied_extra_is_copied_again(model: Path, fresh: dict[str, str], template: Path, tmp_path: Path,
                                           damage: str) -> None:
    """A SIGKILL while an extra file was copied leaves it half-written: the journal did not list it yet
    (or lists what it should hold), so it is copied again."""
    partial = dead_partial(template, tmp_path)
    copy = partial / "generation_config.json"
    if damage == "truncated-unjournaled":
        copy.write_bytes(copy.read_bytes()[:3])
        edit_journal(partial, lambda j: j["extras"].pop("generation_config.json"))
    elif damage == "changed-journaled":
        copy.write_bytes(copy.read_bytes().replace(b"{", b"[", 1))
    elif damage == "missing":
        copy.unlink()
    else:
        edit_journal(partial, lambda j: j.pop("extras"))
    before = tree_digest(model)
    result = resume(model, tmp_path / "out")
    assert_fresh(result, tmp_path / "out", fresh, model, before)
    assert "reusing" in result.stderr
    if damage == "changed-journaled":
        assert "generation_config.json does not match its journal" in result.stderr


@pytest.mark.parametrize("change", ["edited", "removed", "folder-removed", "added"])
def test_resume_follows_the_input_s_extra_files(model: Path, tmp_path: Path, change: str) -> None:
    """An extra file changed, removed or added in the input since the dead run (its weights and config
    unchanged, so its shards are still the job's): the result is a fresh run's of the input as it is now."""
    changed = Path(shutil.copytree(model, tmp_path / "model"))
    partial = make_dead_partial(changed, tmp_path / "work")
    if change == "edited":
        (changed / "extra" / "notes.txt").write_text("a different note, longer than before\n")
    elif change == "removed":
        (changed / "generation_config.json").unlink()
    elif change == "folder-removed":
        shutil.rmtree(changed / "extra")
    else:
        (changed / "tokenizer.json").write_text("{}")
    reference = tmp_path / "reference"
    assert run_cli("quantize", changed, "-o", reference, *ARGS).code == 0
    before = tree_digest(changed)
    result = run_cli("quantize", changed, "-o", tmp_path / "work" / "out", *ARGS, "--resume")
    assert_fresh(result, tmp_path / "work" / "out", tree_digest(reference), changed, before)
    assert "reusing 16 of 16 shards" in result.stderr and not partial.exists()
    if change == "edited":
        assert "notes.txt changed in the input" in result.stderr


def test_resume_removes_files_the_job_does_not_write(model: Path, fresh: dict[str, str], template: Path,
                                                     tmp_path: Path) -> None:
    partial = dead_partial(template, tmp_path)
    (partial / "junk.bin").write_bytes(b"junk")
    (partial / "sub" / "deeper").mkdir(parents=True)
    (partial / "sub" / "deeper" / "x.txt").write_text("x")
    (partial / "model-00099-of-00099.safetensors").write_bytes(b"old layout")
    before = tree_digest(model)
    result = resume(model, tmp_path / "out")
    assert_fresh(result, tmp_path / "out", fresh, model, before)
    assert "removing 3 files" in result.stderr


@pytest.mark.parametrize("damage", ["truncated", "unjournaled", "garbage-journal"])
def test_resume_rewrites_what_the_journal_does_not_prove(model: Path, fresh: dict[str, str], template: Path,
                                                         tmp_path: Path, damage: str) -> None:
    partial = dead_partial(template, tmp_path)
    shard = first_shard(partial)
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "unjournaled":
        edit_journal(partial, lambda j: j["shards"].pop(shard.name))
    else:
        (partial / writing.JOURNAL_NAME).write_bytes(b"\x00not json")
    before = tree_digest(model)
    result = resume(model, tmp_path / "out")
    assert_fresh(result, tmp_path / "out", fresh, model, before)
    assert ("different job" in result.stderr) == (damage == "garbage-journal")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_resume_refuses_a_mount_inside_the_partial(model: Path, template: Path, tmp_path: Path) -> None:
    partial = dead_partial(template, tmp_path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(partial / "extra")], check=True)
    try:
        before_input, before_place = tree_digest(model), snapshot(tmp_path)
        assert_refused(resume(model, tmp_path / "out"), 2, "another file system", input_dir=model,
                       before_input=before_input, place=tmp_path, before_place=before_place)
    finally:
        subprocess.run(["umount", str(partial / "extra")], check=True)


# ---------------------------------------------------------------- liveness: the lock, not /proc


def _fork(child: Callable[[int], None]) -> tuple[int, int]:
    """Fork a child running ``child(write_fd)``; returns (pid, read_fd). The child never returns."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_fd)
            child(write_fd)
        finally:
            os._exit(0)
    os.close(write_fd)
    return pid, read_fd


def _read_line(fd: int) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        assert chunk, "the child died before it was ready"
        data += chunk
    return data.decode().strip()


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _child_run(target: Path, template: Path | None, model: Path) -> Callable[[int], None]:
    """A child that starts writing ``target`` as a run does (the library's own OutputFolder, its lock
    held), copies the template's shards into it journaling each, then waits to be killed. The child's
    token is this process's (a fork keeps writing.OWNER): the token repeats, as across PID namespaces."""
    def child(write_fd: int) -> None:
        fingerprint = journal_of(template)["fingerprint"] if template is not None else ""
        out = writing.OutputFolder(target, fingerprint)
        out.__enter__()
        if template is not None:
            for name, digest in journal_of(template)["shards"].items():
                shutil.copyfile(template / name, out.path / name)
                out.record(name, digest)
            out.copy("extra/notes.txt", model / "extra" / "notes.txt")
        os.write(write_fd, f"{out.path}\n".encode())
        time.sleep(120)
    return child


@pytest.mark.parametrize("with_resume", [False, True])
def test_a_run_killed_by_sigkill_is_dead_though_its_token_repeats(model: Path, fresh: dict[str, str],
                                                                  template: Path, tmp_path: Path,
                                                                  with_resume: bool) -> None:
    out = tmp_path / "out"
    pid, read_fd = _fork(_child_run(out, template if with_resume else None, model))
    try:
        partial = Path(_read_line(read_fd))
        assert partial.is_dir() and (partial / writing.OWNER_LOCK).is_file()
        assert writing.OWNER.token in partial.name  # the token this run has too
    finally:
        _kill(pid)
        os.close(read_fd)
    assert partial.is_dir()
    before = tree_digest(model)
    result = run_cli("quantize", model, "-o", out, *ARGS, *(["--resume"] if with_resume else []))
    assert_fresh(result, out, fresh, model, before)
    assert not partial.exists()
    if with_resume:
        assert "reusing 16 of 16" in result.stderr
    else:
        assert "that died" in result.stderr


def test_a_live_holder_makes_the_run_refuse(model: Path, fresh: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    pid, read_fd = _fork(_child_run(out, None, model))
    try:
        partial = Path(_read_line(read_fd))
        before_input, before_place = tree_digest(model), snapshot(tmp_path)
        for args in ((), ("--resume",)):
            line = assert_refused(run_cli("quantize", model, "-o", out, *ARGS, *args), 2, "another qconvert run",
                                  input_dir=model, before_input=before_input, place=tmp_path,
                                  before_place=before_place)
            assert str(partial) in line
    finally:
        _kill(pid)
        os.close(read_fd)
    before = tree_digest(model)
    assert_fresh(run_cli("quantize", model, "-o", out, *ARGS), out, fresh, model, before)


def test_a_proc_token_that_says_alive_does_not_keep_a_dead_locked_partial(
        model: Path, fresh: dict[str, str], template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/proc would say the dead run is alive (its PID and start time reused, as PID 1 in a container
    whose /proc is the host's): its lock is free, so it is dead."""
    partial = dead_partial(template, tmp_path)
    other = writing.Owner(writing.OWNER.host, writing.OWNER.boot, 1, 12345)
    renamed = partial.rename(tmp_path / f".out.qconvert-{other.token}~dead.partial")
    calls: list[int] = []
    monkeypatch.setattr(writing, "_start_ticks", lambda pid: calls.append(pid) or 12345)
    assert other.alive() and calls == [1], "the /proc stand-in does not say alive"
    before = tree_digest(model)
    result = resume(model, tmp_path / "out")
    assert_fresh(result, tmp_path / "out", fresh, model, before)
    assert "reusing" in result.stderr and not renamed.exists()


def test_a_lockless_leftover_with_this_run_s_token_is_not_this_run_s(model: Path, fresh: dict[str, str],
                                                                     tmp_path: Path) -> None:
    """A run killed between making its folder and its lock, in another PID namespace: same token."""
    leftover = tmp_path / f".out.qconvert-{writing.OWNER.token}.partial"
    leftover.mkdir()
    (leftover / "model-00001-of-00016.safetensors").write_bytes(b"half")
    before = tree_digest(model)
    result = run_cli("quantize", model, "-o", tmp_path / "out", *ARGS)
    assert_fresh(result, tmp_path / "out", fresh, model, before)
    assert not leftover.exists()


def test_a_retired_old_output_of_a_dead_run_is_removed(model: Path, fresh: dict[str, str], template: Path,
                                                       tmp_path: Path) -> None:
    old = dead_partial(template, tmp_path).rename(tmp_path / template.name.replace(".partial", ".old"))
    before = tree_digest(model)
    result = run_cli("quantize", model, "-o", tmp_path / "out", *ARGS)
    assert_fresh(result, tmp_path / "out", fresh, model, before)
    assert not old.exists()


def test_a_fifo_where_the_target_lock_goes_is_refused(model: Path, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / ".out.qconvert.lock")
    before_input, before_place = tree_digest(model), snapshot(tmp_path)
    assert_refused(run_cli("quantize", model, "-o", tmp_path / "out", *ARGS), 2, "is not a regular file",
                   input_dir=model, before_input=before_input, place=tmp_path, before_place=before_place)


# ---------------------------------------------------------------- an existing empty folder, a mount point


def test_an_existing_empty_folder_is_filled_in_place(model: Path, fresh: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o750)
    identity = os.stat(out).st_ino
    before = tree_digest(model)
    assert_fresh(run_cli("quantize", model, "-o", out, *ARGS), out, fresh, model, before)
    assert os.stat(out).st_ino == identity and os.stat(out).st_mode & 0o777 == 0o750  # the same folder
    assert sorted(os.listdir(tmp_path)) == ["out"]


class MountPoint:
    """``target`` behaves as a mount point: os.path.ismount says so, and renaming it fails with EBUSY
    (as the kernel answers for a real one)."""

    def __init__(self, target: Path, monkeypatch: pytest.MonkeyPatch):
        self.target = str(target)
        self.asked = 0
        self.renames = 0
        real_ismount, real_rename = os.path.ismount, os.rename

        def ismount(path: object) -> bool:
            if os.path.realpath(str(path)) == self.target:
                self.asked += 1
                return True
            return real_ismount(path)

        def rename(src: object, dst: object, *args: object, **kwargs: object) -> None:
            if self.target in (os.path.realpath(str(src)), os.path.realpath(str(dst))):
                self.renames += 1
                raise OSError(errno.EBUSY, "Device or resource busy", str(src))
            real_rename(src, dst, *args, **kwargs)

        monkeypatch.setattr(os.path, "ismount", ismount)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(Path, "rename", lambda self_, dst: (rename(self_, dst), Path(dst))[1])


def test_an_empty_mount_point_is_filled_in_place(model: Path, fresh: dict[str, str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    mount = MountPoint(out, monkeypatch)
    before = tree_digest(model)
    result = run_cli("quantize", model, "-o", out, *ARGS)
    assert mount.asked > 0 and mount.renames == 0  # seen as a mount point; never renamed
    assert_fresh(result, out, fresh, model, before)


def test_a_mount_point_with_an_old_output_is_replaced_with_overwrite(model: Path, fresh: dict[str, str],
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    (out / "old-sub").mkdir(parents=True)
    (out / "old-sub" / "old.txt").write_text("old")
    (out / "config.json").write_text("{}")
    mount = MountPoint(out, monkeypatch)
    before_input, before_place = tree_digest(model), snapshot(tmp_path)
    assert_refused(run_cli("quantize", model, "-o", out, *ARGS), 2, "not empty", input_dir=model,
                   before_input=before_input, place=tmp_path, before_place=before_place)
    result = run_cli("quantize", model, "-o", out, *ARGS, "--overwrite")
    assert mount.asked > 0 and mount.renames == 0
    assert_fresh(result, out, fresh, model, before_input)


def test_a_failure_inside_a_mount_point_leaves_it_empty(model: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    mount = MountPoint(out, monkeypatch)
    fired = []

    def full_disk(*_args: object, **_kwargs: object) -> None:
        fired.append(True)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "_execute", full_disk)
    before_input, before_place = tree_digest(model), snapshot(tmp_path)
    assert_refused(run_cli("quantize", model, "-o", out, *ARGS), 1, "disk filled up", input_dir=model,
                   before_input=before_input, place=tmp_path, before_place=before_place)
    assert fired and mount.asked > 0 and os.listdir(out) == []


def test_a_failed_move_into_place_puts_everything_back(model: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The last move (config.json, the completion marker) fails: every file moved is moved back, and
    the folder is as it was (empty)."""
    out = tmp_path / "out"
    out.mkdir()
    real_rename = os.rename
    fired = []

    def rename(src: object, dst: object, *args: object, **kwargs: object) -> None:
        if str(dst) == str(out / "config.json"):
            fired.append(src)
            raise OSError(errno.EIO, "Input/output error", str(dst))
        real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    before_input, before_place = tree_digest(model), snapshot(tmp_path)
    result = run_cli("quantize", model, "-o", out, *ARGS)
    assert fired
    assert result.code == 1 and len(result.stderr_lines) == 1 and control_free(result.stderr_lines[0]), result.stderr
    assert "could not move the output into place" in result.stderr and "left as it was" in result.stderr
    assert tree_digest(model) == before_input and snapshot(tmp_path) == before_place and os.listdir(out) == []


def test_a_dead_in_place_partial_does_not_make_the_folder_non_empty(model: Path, fresh: dict[str, str],
                                                                     template: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    inside = Path(shutil.copytree(template, out / template.name.replace(".out.qconvert-", ".qconvert-")))
    before = tree_digest(model)
    result = run_cli("quantize", model, "-o", out, *ARGS, "--resume")
    assert_fresh(result, out, fresh, model, before)
    assert "reusing" in result.stderr and not inside.exists()


def test_a_target_that_is_a_fifo_is_refused(model: Path, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "out")
    before_input, before_place = tree_digest(model), snapshot(tmp_path)
    assert_refused(run_cli("quantize", model, "-o", tmp_path / "out", *ARGS), 2, "not a folder", input_dir=model,
                   before_input=before_input, place=tmp_path, before_place=before_place)


# ---------------------------------------------------------------- parents made by a failed run


@pytest.fixture
def failing_execute(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    fired: list[bool] = []

    def crash(*_args: object, **_kwargs: object) -> None:
        fired.append(True)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "_execute", crash)
    return fired


def test_parents_made_by_a_failed_run_are_removed(model: Path, tmp_path: Path, failing_execute: list[bool]) -> None:
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("mine")
    before_input, before_place = tree_digest(model), snapshot(tmp_path)
    out = tmp_path / "existing" / "new" / "parents" / "out"
    assert_refused(run_cli("quantize", model, "-o", out, *ARGS), 1, "disk filled up", input_dir=model,
                   before_input=before_input, place=tmp_path, before_place=before_place)
    assert failing_execute and not (tmp_path / "existing" / "new").exists()


def test_parents_of_a_refused_run_are_removed(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused after the output was locked (its parents made): the disk is too small."""
    import collections

    from qconvert import preflight

    asked: list[object] = []
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: asked.append(path) or usage(10**6, 0, 1000))
    before_input, before_place = tree_digest(model), snapshot(tmp_path)
    assert_refused(run_cli("quantize", model, "-o", tmp_path / "new" / "out", *ARGS), 2, "needs", input_dir=model,
                   before_input=before_input, place=tmp_path, before_place=before_place)
    assert asked


def test_parents_of_a_successful_run_stay(model: Path, fresh: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "new" / "parents" / "out"
    before = tree_digest(model)
    assert_fresh(run_cli("quantize", model, "-o", out, *ARGS), out, fresh, model, before)


def test_parents_made_by_an_interrupted_run_are_removed(model: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fired = []

    def interrupt(*_args: object, **_kwargs: object) -> None:
        fired.append(True)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_execute", interrupt)
    before_input = tree_digest(model)
    result = run_cli("quantize", model, "-o", tmp_path / "a" / "b" / "out", *ARGS)
    assert fired and result.code in (1, 130), result.stderr
    assert len(result.stderr_lines) == 1 and "interrupted" in result.stderr
    assert os.listdir(tmp_path) == [] and tree_digest(model) == before_input


# ---------------------------------------------------------------- the same through convert and batch


@pytest.fixture(scope="module")
def quantized(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("q") / "fp8"
    assert run_cli("quantize", model, "-o", out, "--scheme", "fp8-tensor").code == 0
    return out


CONVERT = ("--op", "dequantize", "--max-shard-size", "100KB")


def test_convert_into_an_empty_mount_point_and_with_new_parents(quantized: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    reference = tmp_path / "reference"
    result = run_cli("convert", quantized, "-o", reference, *CONVERT)
    assert result.code == 0, result.stderr
    out = tmp_path / "mount"
    out.mkdir()
    mount = MountPoint(out, monkeypatch)
    before = tree_digest(quantized)
    assert_fresh(run_cli("convert", quantized, "-o", out, *CONVERT), out, tree_digest(reference), quantized, before)
    assert mount.asked > 0 and mount.renames == 0


def test_convert_failing_removes_its_parents(quantized: Path, tmp_path: Path, failing_execute: list[bool]) -> None:
    before_input, before_place = tree_digest(quantized), snapshot(tmp_path)
    assert_refused(run_cli("convert", quantized, "-o", tmp_path / "n" / "out", *CONVERT), 1, "disk filled up",
                   input_dir=quantized, before_input=before_input, place=tmp_path, before_place=before_place)
    assert failing_execute


def test_convert_resume_refuses_a_fifo_journal(quantized: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(writing.OutputFolder, "commit", lambda _self: (_ for _ in ()).throw(RuntimeError("death")))
        patch.setattr(writing.OutputFolder, "__exit__", lambda *_: None)
        assert run_cli("convert", quantized, "-o", tmp_path / "out", *CONVERT).code == 1
    [partial] = tmp_path.glob(".out.qconvert-*.partial")
    _replace_with("fifo", partial / writing.JOURNAL_NAME)
    before_input, before_place = tree_digest(quantized), snapshot(tmp_path)
    assert_refused(run_cli("convert", quantized, "-o", tmp_path / "out", *CONVERT, "--resume"), 2, "is a FIFO",
                   input_dir=quantized, before_input=before_input, place=tmp_path, before_place=before_place)


def _batch(tmp_path: Path, model: Path, output: Path, quiet: bool = True) -> CliResult:
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(f"jobs:\n  - model: {model}\n    scheme: rtn8\n    output: {output}\n    max-shard-size: 100KB\n")
    return run_cli("batch", jobs, *(["-q"] if quiet else []))


def test_batch_into_an_empty_mount_point(model: Path, fresh: dict[str, str], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "place" / "out"
    out.mkdir(parents=True)
    mount = MountPoint(out, monkeypatch)
    before = tree_digest(model)
    result = _batch(tmp_path, model, out)
    assert result.code == 0, result.stderr
    assert mount.asked > 0 and mount.renames == 0
    assert {k: v for k, v in tree_digest(out).items() if k != FINGERPRINT_NAME} == fresh
    assert (out / FINGERPRINT_NAME).is_file() and tree_digest(model) == before
    assert sorted(os.listdir(tmp_path / "place")) == ["out"]
    again = _batch(tmp_path, model, out)  # up to date: skipped, the fingerprint intact
    assert again.code == 0 and {k: v for k, v in tree_digest(out).items() if k != FINGERPRINT_NAME} == fresh


def test_batch_failing_output_removes_its_parents_and_leaves_nothing(model: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from qconvert import fanout

    fired = []

    def crash(*_args: object) -> int:
        fired.append(True)
        raise OSError(errno.EIO, "Input/output error")

    (tmp_path / "place").mkdir()
    before_input, before_place = tree_digest(model), snapshot(tmp_path / "place")
    monkeypatch.setattr(fanout, "_run_unit", crash)
    result = _batch(tmp_path, model, tmp_path / "place" / "new" / "out", quiet=False)
    assert fired
    assert_refused(result, 1, "Input/output error", input_dir=model, before_input=before_input,
                   place=tmp_path / "place", before_place=before_place)


def test_batch_refuses_while_a_live_run_holds_the_partial(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "place" / "out"
    (tmp_path / "place").mkdir()
    pid, read_fd = _fork(_child_run(out, None, model))
    try:
        partial = _read_line(read_fd)
        before_input, before_place = tree_digest(model), snapshot(tmp_path / "place")
        line = assert_refused(_batch(tmp_path, model, out, quiet=False), 2, "another qconvert run", input_dir=model,
                              before_input=before_input, place=tmp_path / "place", before_place=before_place)
        assert partial in line
    finally:
        _kill(pid)
        os.close(read_fd)


def test_holding_the_lock_file_alone_counts_as_live(model: Path, template: Path, tmp_path: Path) -> None:
    """The bare protocol: any process holding the flock of a partial's lock file is a live owner."""
    partial = dead_partial(template, tmp_path)

    def hold(write_fd: int) -> None:
        fd = os.open(partial / writing.OWNER_LOCK, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(write_fd, b"ready\n")
        time.sleep(120)

    pid, read_fd = _fork(hold)
    try:
        _read_line(read_fd)
        before_input, before_place = tree_digest(model), snapshot(tmp_path)
        assert_refused(resume(model, tmp_path / "out"), 2, "is locked", input_dir=model, before_input=before_input,
                       place=tmp_path, before_place=before_place)
    finally:
        _kill(pid)
        os.close(read_fd)


# ---------------------------------------------------------------- the real thing: PID namespaces, SIGKILL


def _in_namespace(*args: str | Path) -> subprocess.Popen:
    """``python -m qconvert ARGS`` as PID 1 of a new PID namespace that still sees the host's /proc
    (no --mount-proc): its /proc-derived token is the host's PID 1's, the same for every such run."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("QCONVERT_DEBUG", None)
    return subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, "-m", "qconvert", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="PID namespaces need root")
def test_sigkill_in_a_pid_namespace_then_a_rerun_in_another(tmp_path: Path) -> None:
    from tests.conftest import build_linear_shards

    model = build_linear_shards(tmp_path / "model", 1024)
    (model / "README.md").write_text("readme\n")
    args = ("--scheme", "rtn8", "--max-shard-size", "1MB")
    reference = tmp_path / "reference"
    assert run_cli("quantize", model, "-o", reference, *args).code == 0
    before = tree_digest(model)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    proc = _in_namespace("quantize", model, "-o", out, *args)
    deadline = time.monotonic() + 120
    partial = None
    while partial is None:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        for journal in work.glob(f".out.qconvert-*.partial/{writing.JOURNAL_NAME}"):
            with contextlib.suppress(OSError, ValueError):
                if json.loads(journal.read_text())["shards"]:
                    partial = journal.parent
        time.sleep(0.005)
    [child] = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()  # PID 1 inside
    os.kill(int(child), signal.SIGKILL)
    proc.communicate(timeout=60)
    assert partial.is_dir() and writing.Owner.parse(partial.name.split("qconvert-", 1)[1][:-8]).pid == 1
    rerun = _in_namespace("quantize", model, "-o", out, *args, "--resume")
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert "reusing" in stderr
    assert tree_digest(out) == tree_digest(reference) and tree_digest(model) == before
    assert sorted(os.listdir(work)) == ["out"]
