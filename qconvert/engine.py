"""Executing a run's units at the speed of the disk: parallel reads, compute on a CPU or a GPU, parallel
writes, with a byte budget that bounds host memory whatever the model size.

The main thread walks the units in order. For each unit that computes, it takes room for the unit's
input and output bytes and hands the reads to a pool of reader threads, so several tensors are being
read (``pread``) while it works on the oldest one. On the CPU the room is a byte budget. On a GPU it is
a region of one page-locked arena allocated at the start: large tensors are read into it by several
threads in chunks, go over on a copy stream, compute on a compute stream, and come back on a third
stream straight into the arena. One completion thread follows the units in order: it gives the input
region back as soon as its copy to the GPU is done, waits for the results, and cuts them into pieces
that the writer threads write at their final offsets (``pwrite``) at the same time, each starting the
disk's writeback of its bytes so that the ``fsync`` finds little left to do. The arena is what limits
how many units are in flight, so a result is written by several threads at once rather than one: the
last piece written gives the region back. The bytes are then hashed from the page cache for the shard's
journal digest by hasher threads (on the CPU, the writer hashes them from memory), so that a finished
shard is never read back whole and hashing never holds up a write. Tensors that pass through are
copied file to file by the writer threads (``copy_file_range``), several at once. Each shard is fsynced
(and journaled, for ``--resume``) by a writer thread as soon as its last tensor is hashed.

Host memory: the interpreter and torch, plus at most ``budget`` bytes of tensors in flight (a unit
larger than the budget runs alone). GPU memory: one unit's inputs, outputs and temporaries at a time,
plus outputs still being copied back: a few times the largest tensor.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch

from qconvert import malloc_policy
from qconvert.early_cuda import parse_device
from qconvert.errors import BadInputError
from qconvert.progress import Progress
from qconvert.safetensors_io import ShardFile, TensorInfo, TensorReader
from qconvert.units import Unit

MAX_WORKERS = 64
_MIB = 1 << 20


def default_workers() -> int:
    """I/O threads: one per core up to 8 (the disks we target saturate well before that), at least 2."""
    return max(2, min(8, os.cpu_count() or 2))


def resolve_device(name: str | None) -> torch.device:
    """``auto`` (or None): the first CUDA GPU if torch sees one, else the CPU; ``cpu``; ``cuda[:N]``."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    parsed = parse_device(name)
    if parsed is None:
        raise BadInputError(f"--device {name!r:.60}: expected auto, cpu, cuda or cuda:N")
    if parsed[0] == "cpu":
        return torch.device("cpu")
    return cuda_device(name, parsed[1])


def cuda_device(name: str, index: int | None) -> torch.device:
    """GPU ``index`` (None: the current one) once torch is known to see it; checked before ``torch.device``,
    which wraps indices above 127 around (``cuda:999`` would be ``cuda:-25``)."""
    if not torch.cuda.is_available():
        raise BadInputError(f"--device {name}: no CUDA GPU is visible to torch")
    if index is not None and index >= torch.cuda.device_count():
        raise BadInputError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    if index is None:
        # current_device() would create the CUDA context here, on the main thread; warm_up creates it
        # on another while the caller plans. A process that has not chosen a device yet is on GPU 0.
        index = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
    return torch.device("cuda", index)


@dataclass(frozen=True)
class ExecutionSettings:
    """Where units compute and how much I/O runs at once."""

    device: torch.device
    workers: int
    budget_bytes: int
    # On the CPU, hand the free pages inside malloc's arenas back as the run goes (malloc_policy.FreePages): set
    # for runs whose compute outweighs the pages faulted in again (the search), as a quantize run decides.
    free_pages: bool = False

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def execution_settings(device: str | None = "auto", workers: int | None = None) -> ExecutionSettings:
    """Validated settings for ``--device`` and ``--workers``; the byte budget follows from them.

    The budget (tensors in flight) is 64 MiB per worker on the CPU, where reading far ahead buys
    nothing, and a 256 MiB page-locked arena on a GPU (``QCONVERT_INFLIGHT_MB`` overrides both, for
    experiments; a power of two wastes nothing, as torch rounds page-locked allocations up to one).
    """
    if workers is None:
        workers = default_workers()
    if not 1 <= workers <= MAX_WORKERS:
        raise BadInputError(f"--workers {workers}: expected a number of I/O threads from 1 to {MAX_WORKERS}")
    resolved = resolve_device(device)
    budget = (256 if resolved.type == "cuda" else 64 * workers) * _MIB
    override = os.environ.get("QCONVERT_INFLIGHT_MB")
    if override and override.isdigit() and int(override) > 0:
        budget = int(override) * _MIB
    return ExecutionSettings(resolved, workers, budget)


def warm_up(settings: ExecutionSettings) -> threading.Thread | None:
    """Create the CUDA context on a background thread while the caller plans (it takes about 0.4 s).

    The page-locked arena is not allocated here: a block allocated and freed on this thread was not
    given back to the engine's arena by torch's allocator (measured on the H200 box: 256 MiB more peak
    RSS, no time saved)."""
    if not settings.cuda:
        return None

    def init() -> None:
        with torch.cuda.device(settings.device):  # the current device is per thread
            torch.empty(1, device=settings.device)

    # Not a daemon: an interpreter that exits (say on bad input) while CUDA initialises aborts.
    thread = threading.Thread(target=init, name="qconvert-cuda-init")
    thread.start()
    return thread


class _Budget:
    """Bytes of tensors in flight; the main thread takes, reader and writer threads give back."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._cond = threading.Condition()

    def try_take(self, nbytes: int) -> bool:
        with self._cond:
            if self.used + nbytes > self.capacity and self.used > 0:
                return False
            self.used += nbytes
            return True

    def wait(self, nbytes: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.used + nbytes <= self.capacity or self.used == 0, timeout=1.0)

    def give(self, nbytes: int) -> None:
        with self._cond:
            self.used -= nbytes
            self._cond.notify_all()


_ALIGN = 1 << 12  # regions start on page boundaries, tensors inside them on 256-byte ones
_READ_CHUNK = 16 << 20  # a large tensor is read by several threads, in chunks of this size
# A GPU result is written by several threads in pieces of this size, so that a 100 MB result does not
# hold its arena region while one thread copies it into the page cache (~1.7 GB/s). On the H200 box the
# engine took 2.16 s with 8 MiB pieces and 2.41 s with whole tensors (fp8-block, 7.5 GB; medians of 3,
# with noise of the same order).
_WRITE_PIECE = 8 << 20
_GIL_SWITCH = 0.0005  # seconds, while an engine runs (see Engine.__enter__)


def _aligned(nbytes: int, to: int = _ALIGN) -> int:
    return max(to, -(-nbytes // to) * to)


class _Arena:
    """One page-locked host buffer, allocated once, handed out in regions (first fit, freed regions
    merged with their neighbours). Reads land in it and GPU results come back into it: no page
    faults, no allocator growth, and host memory for tensors in flight is exactly its size."""

    def __init__(self, capacity: int):
        self.capacity = _aligned(capacity)
        self.buffer = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=True)
        self.used = 0
        self.releases = 0  # counts gives, so a waiter cannot miss one that happened before it waited
        self._free: list[tuple[int, int]] = [(0, self.capacity)]  # (offset, size), by offset
        self._cond = threading.Condition()

    def try_take(self, nbytes: int) -> int | None:
        size = _aligned(nbytes)
        with self._cond:
            for index, (offset, free) in enumerate(self._free):
                if free >= size:
                    if free == size:
                        del self._free[index]
                    else:
                        self._free[index] = (offset + size, free - size)
                    self.used += size
                    return offset
        return None

    def give(self, offset: int, nbytes: int) -> None:
        size = _aligned(nbytes)
        with self._cond:
            index = bisect.bisect(self._free, (offset, size))
            self._free.insert(index, (offset, size))
            if index + 1 < len(self._free) and offset + size == self._free[index + 1][0]:
                self._free[index] = (offset, size + self._free.pop(index + 1)[1])
            if index > 0 and self._free[index - 1][0] + self._free[index - 1][1] == offset:
                before = self._free[index - 1]
                self._free[index - 1] = (before[0], before[1] + self._free.pop(index)[1])
            self.used -= size
            self.releases += 1
            self._cond.notify_all()

    def wait(self, seen: int) -> None:
        """Until a region has been given back since ``releases`` was ``seen``."""
        with self._cond:
            self._cond.wait_for(lambda: self.releases != seen, timeout=1.0)

    def tensor(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return self.buffer[offset : offset + nbytes].view(dtype).reshape(shape)


def _layout(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets of tensors packed in one region (each 256-byte aligned), and the region's size."""
    offsets, position = [], 0
    for size in sizes:
        offsets.append(position)
        position += _aligned(size, 256)
    return offsets, _aligned(position)


class _Writeback:
    """``sync_file_range(SYNC_FILE_RANGE_WRITE)``: start writing a range to disk without waiting, so
    the disk works during the run instead of all at the final fsync (Linux; elsewhere a no-op)."""

    _WRITE = 2

    def __init__(self) -> None:
        self._call = None
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name, use_errno=True) if name else None
            call = getattr(libc, "sync_file_range", None) if libc else None
        except OSError:
            call = None
        if call is not None:
            call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            call.restype = ctypes.c_int
            self._call = call

    def start(self, fd: int, offset: int, nbytes: int) -> None:
        if self._call is not None and nbytes > 0:
            self._call(fd, offset, nbytes, self._WRITE)  # advisory: a failure only means no head start


class _Jobs:
    """The futures of the writer and hasher jobs still to finish. Jobs start other jobs (a written
    piece starts a hash, a hash a shard's close), so :meth:`wait` returns only once none is left."""

    def __init__(self) -> None:
        self._futures: list[Future] = []
        self._lock = threading.Lock()

    def add(self, future: Future) -> None:
        with self._lock:
            self._futures.append(future)

    def raise_failed(self) -> None:
        """Raise the error of a job that failed, if one has (from the main thread, between units)."""
        with self._lock:
            done = [f for f in self._futures if f.done()]
            if done:
                self._futures = [f for f in self._futures if not f.done()]
        for future in done:
            future.result()

    def wait(self) -> None:
        while True:
            with self._lock:
                if not self._futures:
                    return
                future = self._futures.pop(0)
            future.result()


@dataclass
class _Pending:
    unit: Unit
    reads: list[Future]
    taken: int = 0  # CPU: budget bytes, given back in two parts
    inputs_share: int = 0
    inputs_at: int = -1  # GPU: arena regions (-1: none; the whole arena for a unit larger than it)
    inputs_size: int = 0
    outputs_at: int = -1
    outputs_size: int = 0
    host_inputs: list[torch.Tensor] | None = None
    landing: dict[str, torch.Tensor] | None = None


class _Profile:
    """QCONVERT_PROFILE=1: where the time went, on stderr (seconds busy per kind of work, summed over threads)."""

    def __init__(self) -> None:
        self.enabled = os.environ.get("QCONVERT_PROFILE") == "1"
        self.busy: dict[str, float] = {}
        self.started = time.perf_counter()
        self._lock = threading.Lock()
        self.units: dict[int, dict[str, float]] = {}  # the first units' timeline, by id of their Unit
        self._names: dict[int, str] = {}

    def mark(self, pending: _Pending, event: str) -> None:
        """The time of ``event`` for one of the first 12 units that compute (QCONVERT_PROFILE=1)."""
        if not self.enabled:
            return
        key = id(pending.unit)  # units live as long as the run; a _Pending's id is reused once it is freed
        if key in self.units or len(self.units) < 12:
            with self._lock:
                self.units.setdefault(key, {})[event] = time.perf_counter() - self.started
                self._names.setdefault(key, pending.unit.outputs[0].name)

    def report_units(self) -> None:
        if self.enabled:
            for key, events in sorted(self.units.items(), key=lambda item: min(item[1].values())):
                line = ", ".join(f"{event} {at:.3f}" for event, at in events.items())
                print(f"qconvert profile: unit {self._names[key]}: {line}", file=sys.stderr, flush=True)

    def add(self, kind: str, since: float) -> None:
        if self.enabled:
            with self._lock:
                self.busy[kind] = self.busy.get(kind, 0.0) + time.perf_counter() - since

    def report(self, stage: str) -> None:
        if self.enabled:
            busy = ", ".join(f"{k} {v:.2f}" for k, v in sorted(self.busy.items()))
            print(f"qconvert profile: {stage} at {time.perf_counter() - self.started:.2f} s "
                  f"({_process_age():.2f} s after the process started); busy: {busy}", file=sys.stderr, flush=True)


def report_stage(stage: str) -> None:
    """QCONVERT_PROFILE=1: that the run reached ``stage``, and when (seconds since the process started)."""
    if os.environ.get("QCONVERT_PROFILE") == "1":
        print(f"qconvert profile: {stage} {_process_age():.2f} s after the process started", file=sys.stderr,
              flush=True)


def _process_age() -> float:
    """Seconds since this process started (Linux; -1 elsewhere)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started = int(stat.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
            return float(uptime.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return -1.0


class Engine:
    """Runs units into shards (see the module docstring). Use as a context manager; :meth:`run` once."""

    def __init__(self, settings: ExecutionSettings, shard_of: dict[str, ShardFile], bar: Progress):
        self.settings = settings
        self.shard_of = shard_of
        self.bar = bar
        self.profile = _Profile()
        self.budget = _Budget(settings.budget_bytes)
        self.reader = TensorReader()
        self.readers = ThreadPoolExecutor(settings.workers, thread_name_prefix="qconvert-read")
        self.writers = ThreadPoolExecutor(settings.workers, thread_name_prefix="qconvert-write")
        self.hashers = ThreadPoolExecutor(settings.workers, thread_name_prefix="qconvert-hash")
        # GPU: follows the units in order (their copy events complete in that order), see _complete_cuda.
        self.completer = ThreadPoolExecutor(1, thread_name_prefix="qconvert-complete")
        self.jobs = _Jobs()
        self._closing: set[int] = set()
        self._closing_lock = threading.Lock()
        self.writeback = _Writeback()
        self.streams: tuple[torch.cuda.Stream, ...] = ()
        self.arena: _Arena | None = None
        self.profile.report("engine starts")
        if settings.cuda:
            torch.cuda.set_device(settings.device)
            self.streams = tuple(torch.cuda.Stream(settings.device) for _ in range(3))  # h2d, compute, d2h
            self.arena = _Arena(settings.budget_bytes)
            self.profile.report("CUDA ready, arena allocated")
        else:
            malloc_policy.for_engine_on_cpu()
        self.free_pages = malloc_policy.FreePages(settings.budget_bytes) if settings.free_pages else None

    def __enter__(self) -> Engine:
        # Two dozen threads spend most of their time in system calls and hashing, each needing the GIL
        # back for a moment between them, while the main thread drives the GPU in Python. At the default
        # 5 ms switch interval a thread coming back from a 4 ms pwrite can wait longer for the GIL than it
        # took to write. Measured on the H200 box (fp8-block, 7.5 GB): the engine took 2.16 s instead of 2.52.
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(_GIL_SWITCH)
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        # On an error, queued jobs are dropped and running ones finish before the caller closes the
        # shards' descriptors under them.
        # Upstream first: the completer starts writes, writes start hashes, hashes start closes.
        for pool in (self.readers, self.completer, self.writers, self.hashers):
            pool.shutdown(wait=True, cancel_futures=exc_type is not None)
        self.reader.close()
        sys.setswitchinterval(self._switch_interval)

    # -- the main loop -------------------------------------------------------------------------

    def run(self, units: Iterable[Unit]) -> None:
        window: deque[_Pending] = deque()
        lookahead = 2 * self.settings.workers
        for unit in units:
            self.jobs.raise_failed()
            if unit.produce is None:
                self.jobs.add(self.writers.submit(self._copy, unit))
                self.bar.advance(unit.input_bytes)
                continue
            while True:
                seen = self.arena.releases if self.arena is not None else 0
                pending = None if len(window) >= lookahead else self._schedule(unit)
                if pending is not None:
                    break
                if window:
                    self._compute(window.popleft())
                else:
                    self.jobs.raise_failed()
                    self._wait_for_room(unit, seen)
            window.append(pending)
        while window:
            self._compute(window.popleft())
        self.profile.report("units done")
        self.jobs.wait()  # every write, hash and close the units started
        self.profile.report("every write, hash and shard close done")
        self._close_shards()
        self.profile.report("shards synced")
        self.profile.report_units()

    def _wait_for_room(self, unit: Unit, seen: int) -> None:
        if self.arena is not None:
            self.arena.wait(seen)
        else:
            self.budget.wait(min(self._cost(unit), self.budget.capacity))

    @staticmethod
    def _cost(unit: Unit) -> int:
        return unit.input_bytes + sum(spec.nbytes for spec in unit.outputs)

    def _schedule(self, unit: Unit) -> _Pending | None:
        """Take room for ``unit`` and start its reads; None when there is no room yet."""
        if self.arena is None:
            taken = min(self._cost(unit), self.budget.capacity)
            if not self.budget.try_take(taken):
                return None
            read = self.readers.submit(self._read, unit)
            pending = _Pending(unit, [read], taken=taken, inputs_share=min(unit.input_bytes, taken))
            self.profile.mark(pending, "scheduled")
            return pending
        arena = self.arena
        in_offsets, in_size = _layout([info.nbytes for info in unit.inputs])
        out_offsets, out_size = _layout([spec.nbytes for spec in unit.outputs])
        if in_size + out_size > arena.capacity:
            # Larger than the whole arena: runs alone, through ordinary memory.
            if arena.try_take(arena.capacity) is None:
                return None
            return _Pending(unit, [self.readers.submit(self._read, unit)], inputs_at=0, inputs_size=arena.capacity)
        inputs_at = arena.try_take(in_size)
        if inputs_at is None:
            return None
        outputs_at = arena.try_take(out_size)
        if outputs_at is None:
            arena.give(inputs_at, in_size)
            return None
        host = [arena.tensor(inputs_at + offset, info.nbytes, info.dtype, info.shape)
                for offset, info in zip(in_offsets, unit.inputs, strict=True)]
        landing = {spec.name: arena.tensor(outputs_at + offset, spec.nbytes, spec.dtype, spec.shape)
                   for offset, spec in zip(out_offsets, unit.outputs, strict=True)}
        reads = []
        for info, tensor in zip(unit.inputs, host, strict=True):
            raw = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            for start in range(0, info.nbytes, _READ_CHUNK):
                length = min(_READ_CHUNK, info.nbytes - start)
                reads.append(self.readers.submit(self._read_chunk, info, raw[start : start + length], start, length))
        pending = _Pending(unit, reads, inputs_at=inputs_at, inputs_size=in_size, outputs_at=outputs_at,
                           outputs_size=out_size, host_inputs=host, landing=landing)
        self.profile.mark(pending, "scheduled")
        return pending

    # -- jobs ----------------------------------------------------------------------------------

    def _read(self, unit: Unit) -> list[torch.Tensor]:
        started = time.perf_counter()
        tensors = [self.reader.read(info) for info in unit.inputs]
        self.profile.add("read", started)
        return tensors

    def _read_chunk(self, info: TensorInfo, out: memoryview, start: int, length: int) -> None:
        started = time.perf_counter()
        self.reader.read_into(info, out, start, length)
        self.profile.add("read", started)

    def _copy(self, unit: Unit) -> None:
        started = time.perf_counter()
        spec, info = unit.outputs[0], unit.inputs[0]
        shard = self.shard_of[spec.name]
        position = shard.position(spec.name)
        self.reader.copy_into(info, shard.fd, position)
        self.writeback.start(shard.fd, position, info.nbytes)
        self.profile.add("copy", started)
        self.jobs.add(self.hashers.submit(self._hash, [spec.name]))

    def _hash(self, names: list[str]) -> None:
        """Hash tensors written to their shards from the page cache (``mark_written``), then close any
        shard this completes."""
        started = time.perf_counter()
        for name in names:
            self.shard_of[name].mark_written(name)
        self.profile.add("hash", started)
        self._close_completed(names)

    def _close_completed(self, names: list[str] | dict[str, torch.Tensor]) -> None:
        for shard in {id(self.shard_of[name]): self.shard_of[name] for name in names}.values():
            self._close_if_complete(shard)

    def _close_if_complete(self, shard: ShardFile) -> None:
        """Close (fsync) a shard as soon as its last tensor is written (and hashed), on a writer thread: its
        close journals it for ``--resume``, so a run killed later keeps it. Once only, whichever job
        finished it."""
        with self._closing_lock:
            if shard.pending or shard.fd < 0 or id(shard) in self._closing:
                return
            self._closing.add(id(shard))
            self.jobs.add(self.writers.submit(shard.close))

    def _release(self, pending: _Pending, inputs: bool, outputs: bool) -> None:
        if self.arena is None:
            self.budget.give((pending.inputs_share if inputs else 0)
                             + (pending.taken - pending.inputs_share if outputs else 0))
            return
        if inputs and pending.inputs_at >= 0:
            self.arena.give(pending.inputs_at, pending.inputs_size)
        if outputs and pending.outputs_at >= 0:
            self.arena.give(pending.outputs_at, pending.outputs_size)

    def _compute(self, pending: _Pending) -> None:
        started = time.perf_counter()
        try:
            results = [read.result() for read in pending.reads]
            self.profile.mark(pending, "read")
            if not self.settings.cuda:
                outputs, loaded, ready = pending.unit.produce(results[0]), None, None  # type: ignore[misc]
                self._release(pending, inputs=True, outputs=False)
            else:
                host = pending.host_inputs if pending.host_inputs is not None else results[0]
                outputs, loaded, ready = self._compute_cuda(pending, host)
            del results
            if self.free_pages is not None and not self.settings.cuda:
                self.free_pages.freed(pending.unit.input_bytes)  # the inputs are freed now
        except BaseException:
            for read in pending.reads:
                read.cancel()
            for read in pending.reads:
                if not read.cancelled():
                    read.exception()  # wait: the arena region may still be being written
            self._release(pending, inputs=True, outputs=True)
            raise
        self.profile.add("compute", started)
        self.profile.mark(pending, "launched")
        self.bar.advance(pending.unit.input_bytes)
        if loaded is None or ready is None:
            self.jobs.add(self.writers.submit(self._write, pending, outputs))
        else:
            self.jobs.add(self.completer.submit(self._complete_cuda, pending, outputs, loaded, ready))

    def _compute_cuda(self, pending: _Pending, host: list[torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], torch.cuda.Event, torch.cuda.Event]:
        h2d, compute, d2h = self.streams
        device = self.settings.device
        with torch.cuda.stream(h2d):
            inputs = [t.to(device, non_blocking=True) for t in host]
            loaded = torch.cuda.Event()
            loaded.record(h2d)
        compute.wait_event(loaded)
        for tensor in inputs:
            tensor.record_stream(compute)  # allocated on h2d, used on compute
        with torch.cuda.stream(compute):
            produced = pending.unit.produce(inputs)  # type: ignore[misc]
        del inputs
        d2h.wait_stream(compute)
        outputs: dict[str, torch.Tensor] = {}
        with torch.cuda.stream(d2h):
            for name, tensor in produced.items():
                if tensor.device.type != "cuda":
                    outputs[name] = tensor
                    continue
                tensor.record_stream(d2h)
                landing = (pending.landing or {}).get(name)
                if landing is None or landing.dtype != tensor.dtype or landing.shape != tensor.shape:
                    landing = torch.empty(tensor.shape, dtype=tensor.dtype)  # (a unit larger than the arena)
                outputs[name] = landing.copy_(tensor, non_blocking=landing.is_pinned())
            ready = torch.cuda.Event()
            ready.record(d2h)
        return outputs, loaded, ready

    def _write(self, pending: _Pending, outputs: dict[str, torch.Tensor]) -> None:
        """CPU: write a unit's results whole, hashing them from memory (no second read on machines with few
        cores), then give their budget back."""
        try:
            started = time.perf_counter()
            for name, tensor in outputs.items():
                shard = self.shard_of[name]
                shard.write(name, tensor, written=partial(self.writeback.start, shard.fd))
            self.profile.add("write", started)
            self.profile.mark(pending, "written")
            self._close_completed(outputs)
        finally:
            self._release(pending, inputs=False, outputs=True)

    def _complete_cuda(self, pending: _Pending, outputs: dict[str, torch.Tensor], loaded: torch.cuda.Event,
                       ready: torch.cuda.Event) -> None:
        """GPU, one unit at a time in order: give the input region back once its copy to the GPU is done,
        wait for the results in the arena, and hand them to the writer threads in pieces."""
        inputs_released, handed_over = False, False
        try:
            loaded.synchronize()
            self._release(pending, inputs=True, outputs=False)
            inputs_released = True
            ready.synchronize()
            self.profile.mark(pending, "computed")
            pieces: list[tuple[str, memoryview, int]] = []
            for name, tensor in outputs.items():
                self.shard_of[name].check_planned(name, tensor)
                data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
                pieces.extend((name, data[start : start + _WRITE_PIECE], start)
                              for start in range(0, max(len(data), 1), _WRITE_PIECE))
            written = _UnitWrite(self, pending, list(outputs), len(pieces))
            handed_over = True
            for name, data, start in pieces:
                self.jobs.add(self.writers.submit(written.piece, name, data, start))
        finally:
            if not handed_over:
                self._release(pending, inputs=not inputs_released, outputs=True)

    def _write_piece(self, name: str, data: memoryview, start: int) -> None:
        started = time.perf_counter()
        shard = self.shard_of[name]
        shard.write_range(name, data, start)
        self.writeback.start(shard.fd, shard.position(name) + start, len(data))
        self.profile.add("write", started)

    def _pieces_written(self, written: _UnitWrite) -> None:
        """The last piece of a GPU unit is in its file: the region is free again; hash the results (from the
        page cache, on the hasher threads) unless a piece failed."""
        self._release(written.pending, inputs=False, outputs=True)
        self.profile.mark(written.pending, "written")
        if not written.failed:
            self.jobs.add(self.hashers.submit(self._hash, written.names))

    def _close_shards(self) -> None:
        """fsync and close every shard not closed yet, in parallel."""
        shards = {id(shard): shard for shard in self.shard_of.values()
                  if shard.fd >= 0 and id(shard) not in self._closing}
        for future in [self.writers.submit(shard.close) for shard in shards.values()]:
            future.result()


class _UnitWrite:
    """A GPU unit's results being written in pieces by several writer threads; whichever piece finishes
    last (written or failed) ends the unit (:meth:`Engine._pieces_written`)."""

    def __init__(self, engine: Engine, pending: _Pending, names: list[str], pieces: int):
        self.engine = engine
        self.pending = pending
        self.names = names
        self.remaining = pieces
        self.failed = False
        self._lock = threading.Lock()

    def piece(self, name: str, data: memoryview, start: int) -> None:
        try:
            if not self.failed:  # after a failure the run stops: skip the rest, only count them down
                self.engine._write_piece(name, data, start)
        except BaseException:
            self.failed = True
            raise
        finally:
            with self._lock:
                self.remaining -= 1
                last = self.remaining == 0
            if last:
                self.engine._pieces_written(self)


def execute(units: list[Unit], shard_of: dict[str, ShardFile], bar: Progress, settings: ExecutionSettings) -> None:
    with Engine(settings, shard_of, bar) as engine:
        engine.run(units)
