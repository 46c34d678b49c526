"""Writing an output checkpoint: shard layout, the index, and the temporary folder that becomes the
output only once everything in it is complete and on disk."""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from qconvert.errors import BadInputError, QConvertError
from qconvert.safetensors_io import TensorSpec, file_digest

INDEX_NAME = "model.safetensors.index.json"


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _with_ancestors(path: Path) -> list[Path]:
    path = Path(os.path.abspath(path))
    return [path, *path.parents]


def check_output_location(source: Path, target: Path, overwrite: bool, lock: bool = True) -> None:
    """Refuse outputs that would touch the input or silently replace existing work, and take the
    target's lock (released when the surrounding :func:`run_guard` ends). ``lock=False`` (a dry run,
    which writes nothing, not even the lock file) checks instead that the output's folder could be made.

    Places are compared by (device, inode), not by path: a bind mount, a link or another spelling on a
    case-insensitive file system reaches the same folder under a different name."""
    if len(target.name.encode()) > _name_max(target.parent):
        raise BadInputError(f"{target.parent}: the output folder name ({len(target.name.encode())} bytes) is longer "
                            "than the file system allows")
    source_ids = {i for i in map(_identity, _with_ancestors(source.resolve())) if i}
    input_id = _identity(source)
    for place in _with_ancestors(target):
        if _identity(place) == input_id:
            raise BadInputError(f"{target}: the output cannot be the input folder or inside it ({source})")
    target_id = _identity(target)
    if target_id is not None and target_id in source_ids:
        raise BadInputError(f"{target}: the output cannot contain the input folder {source}")
    if os.path.lexists(target) and not target.is_dir():
        raise BadInputError(f"{target}: exists and is not a folder")
    if target.is_dir() and os.path.ismount(target):
        raise BadInputError(f"{target}: is a mount point; the output is put in place by a rename, so choose a "
                            "folder inside it")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise BadInputError(f"{target}: exists and is not empty (pass --overwrite to replace it)")
        # --overwrite removes the old folder: never when anything inside it is the input or holds it
        # (a bind mount of the input, or of one of its parents, inside the old output).
        for folder, dirs, _ in os.walk(target):
            for name in dirs:
                if _identity(Path(folder) / name) in source_ids and not (Path(folder) / name).is_symlink():
                    raise BadInputError(f"{target}: --overwrite would remove {Path(folder) / name}, which is "
                                        f"the input {source} or holds it")
    if not lock:
        parent = next(p for p in _with_ancestors(Path(os.path.realpath(target)).parent) if p.exists())
        if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
            raise BadInputError(f"{target}: cannot create the output there (Permission denied in {parent})")
        return
    _current_guard().hold(TargetLock(target))


def _name_max(folder: Path) -> int:
    for place in _with_ancestors(folder):
        if place.exists():
            try:
                return os.pathconf(place, "PC_NAME_MAX")
            except (OSError, ValueError):
                break
    return 255


def _stem(target: Path) -> str:
    """The target's name as used in hidden names beside it: long names are cut and made unique with a
    hash, so the hidden names stay within the file system's limit."""
    name = target.name
    if len(name.encode()) <= 100:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return name.encode()[:80].decode(errors="ignore") + "~" + digest


class _RunGuard:
    """Locks taken during one command, released when it ends however it ends."""

    def __init__(self) -> None:
        self.locks: list[TargetLock] = []

    def hold(self, lock: TargetLock) -> None:
        if any(held.path == lock.path for held in self.locks):
            return
        self.locks.append(lock)  # first, so an interrupt during acquire still releases what it got
        lock.acquire()

    def release(self) -> None:
        while self.locks:
            self.locks.pop().release()


_GUARDS = threading.local()  # per thread: parallel runs (a batch) must not release each other's locks


def _current_guard() -> _RunGuard:
    stack = getattr(_GUARDS, "stack", None)
    if not stack:  # outside run_guard(): held until the process exits (the kernel drops flocks then)
        _GUARDS.stack = stack = [_RunGuard()]
    return stack[-1]


@contextmanager
def run_guard() -> Iterator[None]:
    """Wrap one command: every target lock it takes is released when it returns or fails."""
    if not hasattr(_GUARDS, "stack"):
        _GUARDS.stack = []
    guard = _RunGuard()
    _GUARDS.stack.append(guard)
    if threading.current_thread() is threading.main_thread():
        _OUTCOME.clear()
    try:
        yield
    finally:
        _GUARDS.stack.remove(guard)
        guard.release()


class TargetLock:
    """An exclusive ``flock`` on a hidden file beside the target: a second run writing the same target
    fails at once instead of racing the first and silently replacing its output.

    The kernel drops the lock when its holder dies (even by SIGKILL), so a stale lock file never blocks
    anyone; the file is removed by its holder on the way out, and a run that locked a file just removed
    by its previous holder notices (different inode) and locks the new one."""

    def __init__(self, target: Path):
        self.target = Path(os.path.realpath(target))  # one lock however the target is spelled
        self.path = self.target.parent / f".{_stem(self.target)}.qconvert.lock"
        self.fd = -1

    def acquire(self) -> None:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInputError(f"{self.target}: cannot create the output there ({exc.strerror})") from exc
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as exc:
                raise BadInputError(f"{self.target}: cannot create the output there ({exc.strerror})") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise BadInputError(f"{self.target}: another qconvert run ({owner}) is writing this output; "
                                    "wait for it to finish") from None
            if _identity(self.path) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {OWNER.host}".encode(), 0)
                self.fd = fd
                return
            os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
        raise BadInputError(f"{self.target}: could not lock {self.path}")

    def release(self) -> None:
        if self.fd >= 0:
            with suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class Owner:
    """Who wrote a partial folder: enough to tell later whether that process is still alive. The PID
    alone is not: in a container every run may be PID 1; the process start time (since boot) and the
    boot id tell a new process with the old number from the old one."""

    host: str
    boot: str
    pid: int
    start: int

    @property
    def token(self) -> str:
        return f"{self.host}-{self.boot}-{self.pid}-{self.start}"

    @classmethod
    def parse(cls, token: str) -> Owner | None:
        parts = token.rsplit("-", 3)
        if len(parts) != 4 or not parts[2].isdigit() or not parts[3].isdigit():
            return None
        return cls(parts[0], parts[1], int(parts[2]), int(parts[3]))

    def alive(self) -> bool | None:
        """True or False on this machine, None for another host (cannot tell)."""
        if self.host != OWNER.host:
            return None
        if self.boot != OWNER.boot:
            return False  # rebooted since
        return _start_ticks(self.pid) == self.start


def _start_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])  # field 22 of the file: start time in clock ticks since boot
    except (OSError, IndexError, ValueError):
        return None


def _this_owner() -> Owner:
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        boot = "noboot"
    return Owner(host, boot, os.getpid(), _start_ticks(os.getpid()) or 0)


OWNER = _this_owner()
_OUTCOME: list[str] = []  # what an interrupt would leave behind, for the CLI's message


def interrupt_outcome() -> str:
    """What an interrupt (Ctrl-C, SIGTERM, SIGHUP) left on disk, said truthfully."""
    return _OUTCOME[-1] if _OUTCOME else "no output was left behind"


JOURNAL_NAME = ".qconvert-journal.json"
JOURNAL_VERSION = 2  # 2: shard digests are safetensors_io.file_digest (1 was the sha256 of the whole file)


class OutputFolder:
    """A temporary folder beside ``target``, renamed onto it by :meth:`commit`.

    Until the rename, nothing exists at ``target`` that looks like a finished checkpoint; any
    exception (or Ctrl-C) inside the ``with`` block removes the temporary folder. An existing
    ``target`` (with ``--overwrite``) is only removed after the new folder has taken its place.

    The temporary folder's name says who made it (:class:`Owner`), so that a later run can remove the
    leftovers of a run that died (SIGKILL, OOM, power) or, with ``resume``, adopt its finished shards:
    a journal inside it records the job's fingerprint and each finished shard's digest (sha256 of its
    regions' sha256, see ``safetensors_io.file_digest``).
    """

    def __init__(self, target: Path, fingerprint: str = "", resume: bool = False,
                 notice: Callable[[str], None] | None = None):
        # A target given through a link is written where the link points, as before (a link is not
        # replaced by a folder), and the lock and partial names match however it is spelled.
        self.target = Path(os.path.realpath(target))
        self.stem = f".{_stem(self.target)}.qconvert-"
        self.path = self.target.parent / f"{self.stem}{OWNER.token}.partial"
        self._retired = self.target.parent / f"{self.stem}{OWNER.token}.old"
        self.fingerprint = fingerprint
        self.resume = resume
        self.notice = notice or (lambda _message: None)
        self.finished: dict[str, str] = {}  # shard name → digest, as journaled
        self._lock = threading.Lock()

    def __enter__(self) -> OutputFolder:
        _OUTCOME.clear()
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            adopted = self._clean_leftovers()
            if adopted is not None:
                adopted.rename(self.path)
            else:
                self.path.mkdir()
        except OSError as exc:
            raise BadInputError(f"{self.target}: cannot create the output there ({exc.strerror})") from exc
        try:
            self._write_journal()
        except BaseException:  # an interrupt here must not leave the new folder behind either
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        return self

    def _clean_leftovers(self) -> Path | None:
        """Remove what dead runs left beside the target; with ``resume``, return the partial to adopt."""
        adopt = None
        for path in sorted(self.target.parent.glob(glob.escape(self.stem) + "*")):
            kind = path.suffix
            owner = Owner.parse(path.name[len(self.stem):].removesuffix(kind))
            if kind not in (".partial", ".old") or owner is None or owner == OWNER:
                continue
            alive = owner.alive()
            if alive is None:
                self.notice(f"note: leaving {path.name}: made by a run on another host ({owner.host})")
                continue
            if alive:
                continue
            if kind == ".partial" and self.resume and adopt is None and self._journal_matches(path):
                adopt = path
                continue
            shutil.rmtree(path, ignore_errors=True)
            self.notice(f"note: removed {path.name}, left by a qconvert run (pid {owner.pid}) that died")
        if self.resume and adopt is None:
            self.notice("note: --resume: no unfinished run of this job was found; starting from the beginning")
        return adopt

    def _journal_matches(self, partial: Path) -> bool:
        try:
            journal = json.loads((partial / JOURNAL_NAME).read_text())
        except (OSError, ValueError):
            return False
        if isinstance(journal, dict) and journal.get("fingerprint") == self.fingerprint \
                and journal.get("version") != JOURNAL_VERSION:
            self.notice(f"note: --resume: {partial.name} was made by another qconvert version (journal version "
                        f"{journal.get('version')!r}); starting from the beginning")
            return False
        if not isinstance(journal, dict) or journal.get("fingerprint") != self.fingerprint:
            self.notice(f"note: --resume: {partial.name} was made by a different job (input or options differ); "
                        "starting from the beginning")
            return False
        shards = journal.get("shards")
        self.finished = {k: v for k, v in shards.items() if isinstance(v, str)} if isinstance(shards, dict) else {}
        return True

    def reusable(self, name: str, regions: list[tuple[int, int]]) -> bool:
        """Whether shard ``name`` was finished by the adopted run and is still intact: its digest over
        ``regions`` (``safetensors_io.shard_regions`` of its planned tensors) is the journaled one."""
        expected = self.finished.get(name)
        path = self.path / name
        if expected is None or not path.is_file():
            return False
        if file_digest(path, regions) == expected:
            return True
        self.notice(f"note: --resume: {name} does not match its journal; writing it again")
        return False

    def record(self, name: str, digest: str) -> None:
        """Journal one finished shard (thread-safe: shards close on the writer thread)."""
        with self._lock:
            self.finished[name] = digest
            self._write_journal()

    def _write_journal(self) -> None:
        data = {"version": JOURNAL_VERSION, "fingerprint": self.fingerprint, "owner": OWNER.token,
                "shards": self.finished}
        tmp = self.path / (JOURNAL_NAME + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / JOURNAL_NAME)

    def __exit__(self, exc_type: object, exc: object, _tb: object) -> None:
        if exc_type is not None and not _OUTCOME:
            shutil.rmtree(self.path, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise QConvertError(f"{self.target}: the disk filled up while writing the output "
                                f"({exc.strerror}); nothing was left there") from exc

    def commit(self) -> None:
        """Put the finished folder in place. Signals are held off during the renames, so an interrupt
        never lands between them; the message after an interrupt says what is really on disk."""
        (self.path / JOURNAL_NAME).unlink(missing_ok=True)
        signals = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        blocked = threading.current_thread() is threading.main_thread()
        if blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            if self.target.exists():
                self.target.rename(self._retired)
                try:
                    self.path.rename(self.target)
                except BaseException:
                    self._retired.rename(self.target)  # put the old output back where it was
                    raise
                _OUTCOME.append(f"the new output is complete at {self.target}, but the old one was being removed: "
                                f"delete {self._retired} yourself")
            else:
                self.path.rename(self.target)
                _OUTCOME.append(f"the output was already complete at {self.target}")
            _fsync_dir(self.target.parent)
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
        if self._retired.exists():
            shutil.rmtree(self._retired, ignore_errors=True)
            # appended, not put in place of the last: with `batch --jobs N`, another thread's output may
            # have cleared the list since (IndexError seen in tests/test_batch.py)
            _OUTCOME.append(f"the output was already complete at {self.target}")


def check_shard(path: Path, names: set[str]) -> None:
    """Read a finished shard back with the reference reader: it must open, and hold exactly ``names``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            found = set(f.keys())
    except (SafetensorError, OSError) as exc:
        raise QConvertError(f"{path.name}: the shard just written does not read back ({exc}); "
                            "this is a bug in qconvert") from exc
    if found != names:
        raise QConvertError(f"{path.name}: the shard just written holds {len(found)} tensors, "
                            f"{len(names)} were planned; this is a bug in qconvert")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def layout_shards(units: list[list[TensorSpec]], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Fill shards in input order; the tensors of one unit (one quantized layer) stay together."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for unit in units:
        unit_bytes = sum(spec.nbytes for spec in unit)
        if shards[-1] and size + unit_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(unit)
        size += unit_bytes
    return shards


def write_index(folder: Path, shards: dict[str, list[TensorSpec]]) -> None:
    weight_map = {spec.name: name for name, specs in shards.items() for spec in specs}
    total = sum(spec.nbytes for specs in shards.values() for spec in specs)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(folder / INDEX_NAME, index)


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def parse_size(text: str) -> int:
    """``5GB`` → 5_000_000_000, ``500MiB`` → 524_288_000, ``123`` → 123 (bytes)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    # float() also takes "nan", "inf" and 1e400 (inf): none is a size.
    if unit not in units or not math.isfinite(value) or value <= 0 or value * units[unit] > 2**62:
        raise BadInputError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    return max(1, int(value * units[unit]))
