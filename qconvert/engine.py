"""Executing a run's units at the speed of the disk: parallel reads, compute on a CPU or a GPU, parallel
writes, with a byte budget that bounds host memory whatever the model size.

The main thread walks the units in order. For each unit that computes, it takes budget for the unit's
input and output bytes and hands the reads to a pool of reader threads, so several tensors are being
read (``pread``, into page-locked memory when a GPU computes) while it works on the oldest one. On a GPU
the inputs go over on a copy stream, the unit computes on a compute stream, and its outputs come back
on a third stream into page-locked buffers; a writer thread waits for that copy and writes them at
their final offsets (``pwrite``), then starts the disk's writeback of those bytes so that the final
``fsync`` finds little left to do. Tensors that pass through are copied file to file by the writer
threads (``copy_file_range``), several at once. Every shard is fsynced at the end, all in parallel.

Host memory: the interpreter and torch, plus at most ``budget`` bytes of tensors in flight (a unit
larger than the budget runs alone). GPU memory: one unit's inputs, outputs and temporaries at a time,
plus outputs still being copied back: a few times the largest tensor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from qconvert.errors import BadInputError
from qconvert.progress import Progress
from qconvert.safetensors_io import ShardFile, TensorReader
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
    if name != "cpu" and name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise BadInputError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError(f"--device {name}: no CUDA GPU is visible to torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadInputError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass(frozen=True)
class ExecutionSettings:
    """Where units compute and how much I/O runs at once."""

    device: torch.device
    workers: int
    budget_bytes: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def execution_settings(device: str | None = "auto", workers: int | None = None) -> ExecutionSettings:
    """Validated settings for ``--device`` and ``--workers``; the byte budget follows from them.

    The budget (tensors in flight) is 64 MiB per worker on the CPU, where reading far ahead buys
    nothing, and 512 MiB on a GPU (``QCONVERT_INFLIGHT_MB`` overrides both, for experiments).
    """
    if workers is None:
        workers = default_workers()
    if not 1 <= workers <= MAX_WORKERS:
        raise BadInputError(f"--workers {workers}: expected a number of I/O threads from 1 to {MAX_WORKERS}")
    resolved = resolve_device(device)
    budget = (512 if resolved.type == "cuda" else 64 * workers) * _MIB
    override = os.environ.get("QCONVERT_INFLIGHT_MB")
    if override and override.isdigit() and int(override) > 0:
        budget = int(override) * _MIB
    return ExecutionSettings(resolved, workers, budget)


def warm_up(settings: ExecutionSettings) -> threading.Thread | None:
    """Create the CUDA context on a background thread while the caller plans (it takes a second)."""
    if not settings.cuda:
        return None

    def init() -> None:
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


@dataclass
class _Pending:
    unit: Unit
    taken: int
    inputs_share: int  # part of ``taken`` given back once the unit has computed
    read: Future


class Engine:
    """Runs units into shards (see the module docstring). Use as a context manager; :meth:`run` once."""

    def __init__(self, settings: ExecutionSettings, shard_of: dict[str, ShardFile], bar: Progress):
        self.settings = settings
        self.shard_of = shard_of
        self.bar = bar
        self.budget = _Budget(settings.budget_bytes)
        self.reader = TensorReader()
        self.readers = ThreadPoolExecutor(settings.workers, thread_name_prefix="qconvert-read")
        self.writers = ThreadPoolExecutor(settings.workers, thread_name_prefix="qconvert-write")
        self.writes: list[Future] = []
        self.writeback = _Writeback()
        self.streams: tuple[torch.cuda.Stream, ...] = ()
        if settings.cuda:
            torch.cuda.set_device(settings.device)
            self.streams = tuple(torch.cuda.Stream(settings.device) for _ in range(3))  # h2d, compute, d2h

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        # On an error, queued jobs are dropped and running ones finish before the caller closes the
        # shards' descriptors under them.
        self.readers.shutdown(wait=True, cancel_futures=exc_type is not None)
        self.writers.shutdown(wait=True, cancel_futures=exc_type is not None)
        self.reader.close()

    # -- the main loop -------------------------------------------------------------------------

    def run(self, units: Iterable[Unit]) -> None:
        window: deque[_Pending] = deque()
        lookahead = 2 * self.settings.workers
        for unit in units:
            self._raise_failed_writes()
            if unit.produce is None:
                self.writes.append(self.writers.submit(self._copy, unit))
                self.bar.advance(unit.input_bytes)
                continue
            inputs = unit.input_bytes
            taken = min(inputs + sum(spec.nbytes for spec in unit.outputs), self.budget.capacity)
            while len(window) >= lookahead or not self.budget.try_take(taken):
                if window:
                    self._compute(window.popleft())
                else:
                    self._raise_failed_writes()
                    self.budget.wait(taken)
            window.append(_Pending(unit, taken, min(inputs, taken), self.readers.submit(self._read, unit)))
        while window:
            self._compute(window.popleft())
        for future in self.writes:
            future.result()
        self._close_shards()

    def _raise_failed_writes(self) -> None:
        done = [f for f in self.writes if f.done()]
        for future in done:
            future.result()  # raises the job's error
        if done:
            self.writes = [f for f in self.writes if not f.done()]

    # -- jobs ----------------------------------------------------------------------------------

    def _read(self, unit: Unit) -> list[torch.Tensor]:
        return [self.reader.read(info, pin_memory=self.settings.cuda) for info in unit.inputs]

    def _copy(self, unit: Unit) -> None:
        spec, info = unit.outputs[0], unit.inputs[0]
        shard = self.shard_of[spec.name]
        position = shard.position(spec.name)
        self.reader.copy_into(info, shard.fd, position)
        shard.mark_written(spec.name)
        self.writeback.start(shard.fd, position, info.nbytes)

    def _compute(self, pending: _Pending) -> None:
        try:
            tensors = pending.read.result()
            if self.settings.cuda:
                outputs, ready = self._compute_cuda(pending.unit, tensors)
            else:
                outputs, ready = pending.unit.produce(tensors), None  # type: ignore[misc]
            del tensors
        except BaseException:
            self.budget.give(pending.taken)
            raise
        self.budget.give(pending.inputs_share)
        self.bar.advance(pending.unit.input_bytes)
        self.writes.append(self.writers.submit(self._write, outputs, ready, pending.taken - pending.inputs_share))

    def _compute_cuda(self, unit: Unit, host: list[torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], torch.cuda.Event]:
        h2d, compute, d2h = self.streams
        device = self.settings.device
        with torch.cuda.stream(h2d):
            inputs = [t.to(device, non_blocking=True) for t in host]
        compute.wait_stream(h2d)
        for tensor in inputs:
            tensor.record_stream(compute)  # allocated on h2d, used on compute
        with torch.cuda.stream(compute):
            produced = unit.produce(inputs)  # type: ignore[misc]
        del inputs
        d2h.wait_stream(compute)
        outputs: dict[str, torch.Tensor] = {}
        with torch.cuda.stream(d2h):
            for name, tensor in produced.items():
                if tensor.device.type != "cuda":
                    outputs[name] = tensor
                    continue
                tensor.record_stream(d2h)
                landing = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                outputs[name] = landing.copy_(tensor, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(d2h)
        return outputs, ready

    def _write(self, outputs: dict[str, torch.Tensor], ready: torch.cuda.Event | None, taken: int) -> None:
        try:
            if ready is not None:
                ready.synchronize()
            for name, tensor in outputs.items():
                shard = self.shard_of[name]
                shard.write(name, tensor)
                self.writeback.start(shard.fd, shard.position(name), tensor.numel() * tensor.element_size())
        finally:
            self.budget.give(taken)

    def _close_shards(self) -> None:
        """fsync and close every shard, in parallel: the disk sees all of the remaining writeback at once."""
        shards = {id(shard): shard for shard in self.shard_of.values() if shard.fd >= 0}
        for future in [self.writers.submit(shard.close) for shard in shards.values()]:
            future.result()


def execute(units: list[Unit], shard_of: dict[str, ShardFile], bar: Progress, settings: ExecutionSettings) -> None:
    with Engine(settings, shard_of, bar) as engine:
        engine.run(units)
