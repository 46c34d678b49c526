"""Writing an output checkpoint: shard layout, the index, and the temporary folder that becomes the
output only once everything in it is complete and on disk."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from qconvert.errors import BadInputError, QConvertError
from qconvert.safetensors_io import TensorSpec, file_digest, open_regular

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
    target's lock (released when the surrounding :func:`run_guard` ends). ``lock=False`` (a dry run, which
    writes nothing, not even the lock file; batch's up-front check of every output) checks instead that the
    output's folder could be made.

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
    if target.is_dir() and _contents(Path(os.path.realpath(target))):
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


IN_PLACE_PREFIX = ".qconvert-"  # hidden names inside a target filled in place (partial, retired old output)
IN_PLACE_LOCK = ".qconvert.lock"


def _contents(target: Path) -> list[str]:
    """What an existing output folder holds, leaving out qconvert's own hidden bookkeeping of an
    in-place run (its lock and the unfinished or retired folders, live or dead: sorted out later)."""
    try:
        names = os.listdir(target)
    except OSError:
        return []
    return [name for name in names if name != IN_PLACE_LOCK and not _is_leftover(name, IN_PLACE_PREFIX)]


def _is_leftover(name: str, stem: str) -> bool:
    if not name.startswith(stem):
        return False
    kind = os.path.splitext(name)[1]
    return kind in (".partial", ".old") and Owner.parse(name[len(stem):].removesuffix(kind)) is not None


def fills_in_place(target: Path) -> bool:
    """Whether the output is written inside an existing ``target`` (per-file renames at the end)
    instead of beside it and renamed onto it: for a mount point (a container volume: it cannot be
    renamed) and for any existing empty folder (it may be a bind mount the mount table does not show,
    or sit in a folder the user cannot write; its owner and permissions are kept)."""
    target = Path(os.path.realpath(target))
    if not target.is_dir():
        return False
    return os.path.ismount(target) or not _contents(target)


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
        self.locks: list[TargetLock | _HeldLock] = []

    def hold(self, lock: TargetLock) -> None:
        if any(held.path == lock.path for held in self.locks):
            return
        self.locks.append(lock)  # first, so an interrupt during acquire still releases what it got
        lock.acquire()

    def keep(self, lock: _HeldLock) -> None:
        """Release ``lock`` when the command ends, if its owner has not already."""
        self.locks.append(lock)

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
    """An exclusive ``flock`` on a hidden file beside the target (inside it when the output is filled in
    place, see :func:`fills_in_place`): a second run writing the same target fails at once instead of
    racing the first and silently replacing its output.

    The kernel drops the lock when its holder dies (even by SIGKILL), so a stale lock file never blocks
    anyone; the file is removed by its holder on the way out, and a run that locked a file just removed
    by its previous holder notices (different inode) and locks the new one. The parent folders this
    run created for the target are removed on the way out too when the run left nothing in them."""

    def __init__(self, target: Path):
        self.target = Path(os.path.realpath(target))  # one lock however the target is spelled
        if fills_in_place(self.target):
            self.path = self.target / IN_PLACE_LOCK
        else:
            self.path = self.target.parent / f".{_stem(self.target)}.qconvert.lock"
        self.fd = -1
        self.created: list[Path] = []  # parent folders made by this run, deepest first

    def acquire(self) -> None:
        missing = [p for p in _with_ancestors(self.target.parent) if not os.path.lexists(p)]
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._remove_created(missing)
            raise BadInputError(f"{self.target}: cannot create the output there ({exc.strerror})") from exc
        self.created = missing
        for _ in range(100):
            with suppress(FileNotFoundError):
                if not stat.S_ISREG(os.lstat(self.path).st_mode):  # never open a FIFO or follow a link here
                    raise BadInputError(f"{self.path}: is not a regular file; it is where qconvert locks the "
                                        f"output {self.target}: remove it")
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                             | getattr(os, "O_CLOEXEC", 0), 0o644)
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
        created, self.created = self.created, []
        self._remove_created(created)

    @staticmethod
    def _remove_created(created: list[Path]) -> None:
        """Remove the parent folders this run made, deepest first, while they are empty: a failed run
        leaves no trace; a finished one fills them (its output), so they stay."""
        for folder in created:
            try:
                os.rmdir(folder)
            except FileNotFoundError:
                continue  # never made (mkdir failed below it) or already gone
            except OSError:
                break


class _HeldLock:
    """A ``flock`` held on an open file for as long as the run needs it; released (closed) once."""

    def __init__(self, fd: int, path: Path):
        self.fd = fd
        self.path = path

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _try_lock(path: Path) -> tuple[str, _HeldLock | None]:
    """``("free", lock)``: locked now (its holder died, or never was); ``("held", None)``: a live run
    holds it; ``("missing", None)``; ``("odd", None)``: not a regular file (never opened)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "missing", None
    except OSError:
        return "odd", None
    if not stat.S_ISREG(st.st_mode):
        return "odd", None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return "missing", None
    except OSError:
        return "odd", None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return "held", None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return "odd", None
    return "free", _HeldLock(fd, path)


@dataclass(frozen=True)
class Owner:
    """Who wrote a partial folder, named in it for messages and for the leftovers of qconvert versions
    that did not lock their partial folder (:data:`OWNER_LOCK`): for those, whether that process is
    still alive is told from ``/proc``. The PID alone is not enough: in a container every run may be
    PID 1; the process start time (since boot) and the boot id tell a new process with the old number
    from the old one, but not where a PID namespace shares the host's ``/proc`` (the token repeats):
    hence the lock, which the kernel drops when its holder dies, whatever namespace it lived in."""

    host: str
    boot: str
    pid: int
    start: int

    @property
    def token(self) -> str:
        return f"{self.host}-{self.boot}-{self.pid}-{self.start}"

    @classmethod
    def parse(cls, token: str) -> Owner | None:
        """The owner named by ``token`` (a leftover's name between the stem and the suffix; ``~`` and a
        random tag after it make each run's names unique even where two runs' tokens repeat)."""
        parts = token.split("~", 1)[0].rsplit("-", 3)
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
OWNER_LOCK = ".qconvert-owner.lock"  # in a partial folder: flock'd by the run that writes it, for its whole life
_BOOKKEEPING = {JOURNAL_NAME, JOURNAL_NAME + ".tmp", OWNER_LOCK}  # top level of a partial folder, never output
# Put in place last when an output is filled in place: a reader that finds config.json (and batch's
# fingerprint, which it checks) finds every other file already there.
_LAST = ("config.json", ".qconvert-fingerprint.json")
_JOURNAL_MAX = 64 << 20


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


class OutputFolder:
    """A temporary folder where the output is written, put in place by :meth:`commit`.

    Usually the folder is beside ``target`` and renamed onto it. An existing empty ``target`` (or a
    mount point, which cannot be renamed) is filled in place (:func:`fills_in_place`): the temporary
    folder is a hidden sub-folder of it, and commit renames its files into it one by one, ``config.json``
    last. Until commit, nothing exists at ``target`` that looks like a finished checkpoint; any
    exception (or Ctrl-C) inside the ``with`` block removes the temporary folder. An existing
    ``target`` (with ``--overwrite``) is only removed after the new output has taken its place.

    The run holds a ``flock`` on a file in the temporary folder (:data:`OWNER_LOCK`) for its whole life.
    The kernel drops it when the run dies (SIGKILL, OOM), so a later run tells a dead run's leftovers
    from a live run's by taking the lock, whatever PID namespace either lived in; it removes them or,
    with ``resume``, adopts what the journal inside proves finished: shards (each with its digest, the
    sha256 of its regions' sha256, see ``safetensors_io.file_digest``) and copied files (size and
    modification time of the input file, sha256 of the copy). Anything in an adopted folder that is not a
    regular file or a folder (a FIFO, a link, a device), or a folder where a file belongs, is refused,
    never opened; files that the job no longer writes are removed.
    """

    def __init__(self, target: Path, fingerprint: str = "", resume: bool = False,
                 notice: Callable[[str], None] | None = None, planned: Iterable[str] | None = None):
        # A target given through a link is written where the link points, as before (a link is not
        # replaced by a folder), and the lock and partial names match however it is spelled.
        self.target = Path(os.path.realpath(target))
        self.in_place = fills_in_place(self.target)
        beside = (self.target.parent, f".{_stem(self.target)}.qconvert-")
        # Leftovers are looked for where either mode puts them (a run killed before the folder was made).
        self.homes = [(self.target, IN_PLACE_PREFIX), beside] if self.in_place else [beside]
        home, stem = self.homes[0]
        name = f"{stem}{OWNER.token}~{secrets.token_hex(4)}"
        self.path = home / f"{name}.partial"
        self._retired = home / f"{name}.old"
        self.fingerprint = fingerprint
        self.resume = resume
        self.notice = notice or (lambda _message: None)
        self.planned = None if planned is None else set(planned)  # relative paths of every file the job writes
        self.finished: dict[str, str] = {}  # shard name → digest, as journaled
        self.extras: dict[str, list] = {}  # copied file → [input size, input mtime_ns, sha256 of the copy]
        self._lock = threading.Lock()
        self._owner: _HeldLock | None = None

    def __enter__(self) -> OutputFolder:
        _OUTCOME.clear()
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            adopted = self._clean_leftovers()
            if adopted is not None:
                self._check_adopted(adopted)
                try:
                    adopted.rename(self.path)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    self.notice(f"note: --resume: {adopted.name} is on another file system than {self.target}; "
                                "starting from the beginning")
                    self._drop(adopted, self._owner)
                    self._owner, adopted = None, None
            if adopted is None:
                self.path.mkdir()
            if self._owner is None:
                self._lock_new()
            else:
                self._owner.path = self.path / OWNER_LOCK
        except OSError as exc:
            self._release()
            raise BadInputError(f"{self.target}: cannot create the output there ({exc.strerror})") from exc
        except BaseException:
            self._release()
            raise
        try:
            self._write_journal()
        except BaseException:  # an interrupt here must not leave the new folder behind either
            shutil.rmtree(self.path, ignore_errors=True)
            self._release()
            raise
        return self

    def _lock_new(self) -> None:
        path = self.path / OWNER_LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
        self._owner = _HeldLock(fd, path)
        _current_guard().keep(self._owner)  # released when the command ends, however it ends
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
        os.write(fd, f"{OWNER.token}\n".encode())

    def _release(self) -> None:
        if self._owner is not None:
            self._owner.release()
            self._owner = None

    @staticmethod
    def _drop(path: Path, lock: _HeldLock | None) -> None:
        shutil.rmtree(path, ignore_errors=True)  # unlinks links, FIFOs and devices; never opens them
        if lock is not None:
            lock.release()

    def _clean_leftovers(self) -> Path | None:
        """Remove what dead runs left for the target; with ``resume``, return the partial to adopt (its
        lock held, in ``self._owner``). A partial whose lock is held belongs to a live run: refused."""
        adopt = None
        for home, stem in self.homes:
            try:
                names = sorted(os.listdir(home))
            except OSError:
                continue
            for name in names:
                if not _is_leftover(name, stem):
                    continue
                path, kind = home / name, os.path.splitext(name)[1]
                owner = Owner.parse(name[len(stem):].removesuffix(kind))
                assert owner is not None  # _is_leftover
                if owner.host != OWNER.host:  # a lock may not reach across hosts (NFS): never touched
                    self.notice(f"note: leaving {name}: made by a run on another host ({owner.host})")
                    continue
                try:
                    mode = os.lstat(path).st_mode
                except FileNotFoundError:
                    continue
                if not stat.S_ISDIR(mode):
                    if self.resume and kind == ".partial":
                        raise BadInputError(f"{path}: is {_kind(mode)}, not a folder a qconvert run made; remove it "
                                            "(or run without --resume)")
                    self.notice(f"note: leaving {name}: it is {_kind(mode)}, not a folder a qconvert run made")
                    continue
                state, lock = _try_lock(path / OWNER_LOCK)
                if state == "held":
                    raise BadInputError(f"{self.target}: another qconvert run (pid {owner.pid}) is writing this "
                                        f"output (its unfinished folder {path} is locked); wait for it to finish")
                if state == "missing" and not self._dead_without_lock(owner):
                    continue  # a live run of a qconvert that did not lock its folder: left alone, as then
                if lock is not None:
                    _current_guard().keep(lock)
                if kind == ".partial" and self.resume and adopt is None:
                    if state == "odd":
                        raise BadInputError(f"{path / OWNER_LOCK}: is not a regular file; --resume adopts only "
                                            f"what a qconvert run wrote: remove {path} (or run without --resume)")
                    if self._journal_matches(path):
                        adopt, self._owner = path, lock
                        continue
                self._drop(path, lock)
                self.notice(f"note: removed {name}, left by a qconvert run (pid {owner.pid}) that died")
        if self.resume and adopt is None:
            self.notice("note: --resume: no unfinished run of this job was found; starting from the beginning")
        return adopt

    @staticmethod
    def _dead_without_lock(owner: Owner) -> bool:
        """For a leftover with no lock file (an older qconvert, or a run killed before it made its lock):
        its owner's liveness from /proc. One with this run's own token is not this run's (this run's names
        carry a fresh random tag and its folder does not exist yet): the token repeats across PID
        namespaces that share the host's /proc."""
        return owner == OWNER or owner.alive() is False

    def _journal_matches(self, partial: Path) -> bool:
        path = partial / JOURNAL_NAME
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self.notice(f"note: --resume: {partial.name} has no journal; starting from the beginning")
            return False
        if not stat.S_ISREG(st.st_mode):
            raise BadInputError(f"{path}: is {_kind(st.st_mode)}, not a regular file; --resume adopts only what a "
                                f"qconvert run wrote: remove {partial} (or run without --resume)")
        try:
            if st.st_size > _JOURNAL_MAX:
                raise ValueError("too large")
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            try:
                journal = json.loads(os.read(fd, _JOURNAL_MAX + 1))
            finally:
                os.close(fd)
        except (OSError, ValueError):
            journal = None
        if isinstance(journal, dict) and journal.get("fingerprint") == self.fingerprint \
                and journal.get("version") != JOURNAL_VERSION:
            self.notice(f"note: --resume: {partial.name} was made by another qconvert version (journal version "
                        f"{journal.get('version')!r}); starting from the beginning")
            return False
        if not isinstance(journal, dict) or journal.get("fingerprint") != self.fingerprint:
            self.notice(f"note: --resume: {partial.name} was made by a different job (input or options differ); "
                        "starting from the beginning")
            return False
        shards, extras = journal.get("shards"), journal.get("extras")
        self.finished = {k: v for k, v in shards.items() if isinstance(v, str)} if isinstance(shards, dict) else {}
        self.extras = {k: v for k, v in extras.items() if isinstance(v, list) and len(v) == 3
                       and [type(x) for x in v] == [int, int, str]} if isinstance(extras, dict) else {}
        return True

    def _check_adopted(self, partial: Path) -> None:
        """Refuse a partial folder holding anything but regular files and folders (never opened: a FIFO
        would hang the run, a link would be written through), or a folder where the job writes a file;
        remove the files the job does not write (a copied file the input no longer has)."""
        root_dev = os.lstat(partial).st_dev
        stale: list[Path] = []

        def refuse(path: Path, what: str) -> None:
            raise BadInputError(f"{path}: is {what}; --resume adopts only the regular files a qconvert run wrote: "
                                f"remove {partial} (or run without --resume)")

        def walk(folder: Path, rel: str) -> bool:
            kept = False
            with os.scandir(folder) as entries:
                found = sorted(entries, key=lambda entry: entry.name)
            for entry in found:
                path, name = Path(entry.path), rel + entry.name
                st = entry.stat(follow_symlinks=False)
                bookkeeping = not rel and entry.name in _BOOKKEEPING
                if st.st_dev != root_dev:
                    refuse(path, "on another file system (a mount point)")
                if stat.S_ISDIR(st.st_mode):
                    if bookkeeping or (self.planned is not None and name in self.planned):
                        refuse(path, "a folder where qconvert writes a file")
                    if walk(path, name + "/"):
                        kept = True
                    else:
                        stale.append(path)  # after its contents
                elif stat.S_ISREG(st.st_mode):
                    if bookkeeping or self.planned is None or name in self.planned:
                        kept = True
                    else:
                        stale.append(path)
                else:
                    refuse(path, f"{_kind(st.st_mode)}, not a regular file")
            return kept

        walk(partial, "")
        files = [path for path in stale if not path.is_dir()]
        if files:
            self.notice(f"note: --resume: removing {len(files)} files of the earlier run that this job does not "
                        f"write (e.g. {files[0].relative_to(partial)})")
        for path in stale:  # files before the folders that held them
            if path in files:
                path.unlink()
            else:
                path.rmdir()

    def reusable(self, name: str, regions: list[tuple[int, int]]) -> bool:
        """Whether shard ``name`` was finished by the adopted run and is still intact: its digest over
        ``regions`` (``safetensors_io.shard_regions`` of its planned tensors) is the journaled one."""
        expected = self.finished.get(name)
        path = self.path / name
        if expected is None or not path.is_file() or path.is_symlink():
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

    def reusable_copy(self, rel: str, source: Path) -> bool:
        """Whether the adopted run's copy of ``source`` (at ``rel``) is complete and still what the input
        holds: journaled, the input file unchanged since (size, modification time), the copy's sha256 the
        journaled one."""
        entry = self.extras.get(rel)
        if entry is None:
            return False
        try:
            src = os.stat(source)
            dst = os.lstat(self.path / rel)
        except OSError:
            return False
        if [src.st_size, src.st_mtime_ns] != entry[:2]:
            self.notice(f"note: --resume: {rel} changed in the input since the earlier run; copying it again")
            return False
        if stat.S_ISREG(dst.st_mode) and dst.st_size == entry[0]:
            with open(self.path / rel, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() == entry[2]:
                    return True
        self.notice(f"note: --resume: {rel} does not match its journal; copying it again")
        return False

    def copy(self, rel: str, source: Path) -> int:
        """Copy ``source`` (a file of the input) to ``rel`` in the folder, as ``shutil.copy2`` would (mode
        and times too), fsync it and journal it; returns its size. Whatever was at ``rel`` (a dead run's
        half copy) is removed first, never written through."""
        dest = self.path / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with suppress(FileNotFoundError):
            dest.unlink()
        fd = open_regular(source)  # follows a hub-cache link to its blob, as copy2 did; never a FIFO
        digest = hashlib.sha256()
        try:
            st = os.fstat(fd)
            with open(dest, "xb") as out:
                while chunk := os.read(fd, 1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        finally:
            os.close(fd)
        shutil.copystat(source, dest)
        with self._lock:
            self.extras[rel] = [st.st_size, st.st_mtime_ns, digest.hexdigest()]
            self._write_journal()
        return st.st_size

    def _write_journal(self) -> None:
        data = {"version": JOURNAL_VERSION, "fingerprint": self.fingerprint, "owner": OWNER.token,
                "shards": self.finished, "extras": self.extras}
        tmp = self.path / (JOURNAL_NAME + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / JOURNAL_NAME)

    def __exit__(self, exc_type: object, exc: object, _tb: object) -> None:
        if exc_type is not None and not _OUTCOME:
            shutil.rmtree(self.path, ignore_errors=True)
        self._release()
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise QConvertError(f"{self.target}: the disk filled up while writing the output "
                                f"({exc.strerror}); nothing was left there") from exc

    def abandon(self) -> None:
        """Remove the folder of an output that will not be committed (batch: this output failed)."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._release()

    def commit(self) -> None:
        """Put the finished folder in place. Signals are held off during the renames, so an interrupt
        never lands between them; the message after an interrupt says what is really on disk."""
        (self.path / JOURNAL_NAME).unlink(missing_ok=True)
        signals = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        blocked = threading.current_thread() is threading.main_thread()
        if blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            if self.in_place:
                self._commit_in_place()
            else:
                self._commit_beside()
        except OSError as exc:  # every move was undone: say so in one line
            raise QConvertError(f"{self.target}: could not move the output into place ({exc.strerror or exc}); "
                                "it was left as it was") from exc
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
        self._release()
        if self._retired.exists():
            shutil.rmtree(self._retired, ignore_errors=True)
            # appended, not put in place of the last: with `batch --jobs N`, another thread's output may
            # have cleared the list since (IndexError seen in tests/test_batch.py)
            _OUTCOME.append(f"the output was already complete at {self.target}")

    def _commit_beside(self) -> None:
        """One rename onto the target (two with an old output: it is retired first, removed after)."""
        lock = self.path / OWNER_LOCK
        if self.target.exists():
            self.target.rename(self._retired)
            try:
                # The retired output carries the lock: if this run dies before removing it, the next one
                # knows it is dead.
                with suppress(FileNotFoundError):
                    os.rename(lock, self._retired / OWNER_LOCK)
                self.path.rename(self.target)
            except BaseException:
                with suppress(OSError):
                    os.rename(self._retired / OWNER_LOCK, lock)
                self._retired.rename(self.target)  # put the old output back where it was
                raise
            _OUTCOME.append(f"the new output is complete at {self.target}, but the old one was being removed: "
                            f"delete {self._retired} yourself")
        else:
            lock.unlink(missing_ok=True)  # the flock stays with the open descriptor until the end
            self.path.rename(self.target)
            _OUTCOME.append(f"the output was already complete at {self.target}")
        _fsync_dir(self.target.parent)

    def _commit_in_place(self) -> None:
        """Rename each file of the folder into the target (same file system: each rename is atomic),
        ``config.json`` and batch's fingerprint last, after an fsync of the target; an old output (a
        mount point with ``--overwrite``) is first moved aside into a hidden folder, removed after. A
        failure half-way moves everything back."""
        lock = self.path / OWNER_LOCK
        old = [name for name in os.listdir(self.target)
               if name != IN_PLACE_LOCK and name != self.path.name and not _is_leftover(name, IN_PLACE_PREFIX)]
        new = sorted((name for name in os.listdir(self.path) if name != OWNER_LOCK),
                     key=lambda name: (_LAST.index(name) + 1 if name in _LAST else 0, name))
        moved_old: list[str] = []
        moved_new: list[str] = []
        try:
            if old:
                self._retired.mkdir()
                with suppress(FileNotFoundError):
                    os.rename(lock, self._retired / OWNER_LOCK)
                for name in old:
                    os.rename(self.target / name, self._retired / name)
                    moved_old.append(name)
            for name in new:
                if name in _LAST and not any(done in _LAST for done in moved_new):
                    _fsync_dir(self.target)  # every other file is in place before the first marker
                os.rename(self.path / name, self.target / name)
                moved_new.append(name)
            _fsync_dir(self.target)
        except BaseException:
            for name in reversed(moved_new):
                os.rename(self.target / name, self.path / name)
            for name in reversed(moved_old):
                os.rename(self._retired / name, self.target / name)
            if old:
                with suppress(OSError):
                    os.rename(self._retired / OWNER_LOCK, lock)
                    self._retired.rmdir()
            raise
        _OUTCOME.append(f"the output was already complete at {self.target}" if not old else
                        f"the new output is complete at {self.target}, but the old one was being removed: "
                        f"delete {self._retired} yourself")
        shutil.rmtree(self.path, ignore_errors=True)  # empty but for the lock file (its flock held till release)


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
