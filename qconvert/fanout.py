"""One read of a checkpoint, several outputs: each input tensor is read once and fed to every output.

Each output is what :func:`qconvert.pipeline.write_checkpoint` would write from the same units (the
same shard layout, index, config and copies, through the same building blocks), in its own temporary
folder renamed into place on success. Units of all outputs run in the order of their first input's
position in the input files, so the units that need one tensor run one after the other: the tensor is
read once, kept while another unit still needs it, then dropped. A tensor that only one copy unit needs
is still copied file to file.

The main thread reads; the units run on a pool of compute threads, one per output up to the number of
cores, so the outputs made from one tensor are quantized at the same time, each on one core (torch's
own intra-op threads are divided among them: on 2 cores, 1 each), and each compute thread writes what
it produced. At most two units per compute thread are in flight, so memory is a few tensors plus the
outputs made from them, whatever the model size.

An output that fails (a NaN in a weight its scheme quantizes, a full disk) is abandoned alone; the
others go on.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qconvert import malloc_policy
from qconvert.checkpoint import Checkpoint
from qconvert.model_card import write_model_card
from qconvert.quantizers import share_group_amax
from qconvert.safetensors_io import ShardFile, TensorInfo, TensorReader
from qconvert.units import Unit
from qconvert.writing import OutputFolder, layout_shards, shard_names, write_index, write_json

Notice = Callable[[str], None]


class Cancelled(Exception):
    """The batch was interrupted (Ctrl-C, SIGTERM) or asked to stop."""


@dataclass
class Output:
    """One output to write, and afterwards what happened to it."""

    checkpoint: Checkpoint
    units: list[Unit]
    target: Path
    config: dict | None
    max_shard_bytes: int
    finish: Callable[[Path], None] | None = None  # called on the complete temporary folder before the rename
    shards: list[str] = field(default_factory=list)
    error: BaseException | None = None
    bytes_in: int = 0  # what a single run of this output alone would read: its tensors and copied files

    # set while writing
    _folder: OutputFolder | None = None
    _shard_files: list[ShardFile] = field(default_factory=list)
    _shard_of: dict[str, ShardFile] = field(default_factory=dict)


def _key(info: TensorInfo) -> tuple[str, int]:
    return str(info.file), info.offset


class _Writer:
    """One writer thread: at most one write in flight while the next unit computes (as in a single run)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qconvert-fanout-write")
        self._pending: Future | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.drain()
        self._pending = self._pool.submit(job)

    def drain(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # jobs catch their own errors; this only waits

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True)


def compute_threads(outputs: int) -> int:
    """Compute threads for ``outputs`` outputs: one each, up to the cores this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(outputs, cores))


class _Compute:
    """The compute threads, at most ``2 * threads`` units in flight (the main thread waits for room)."""

    def __init__(self, threads: int, cancel: threading.Event | None):
        self.threads = threads
        self.cancel = cancel
        self.saved_torch_threads = torch.get_num_threads()
        # torch's intra-op threads divided among the compute threads: several outputs quantized at once,
        # each on its own cores, instead of one at a time over all of them.
        intra = max(1, self.saved_torch_threads // threads)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="qconvert-fanout-compute",
                                        initializer=torch.set_num_threads, initargs=(intra,))
        self._room = threading.Semaphore(2 * threads)
        self._futures: list[Future] = []

    def submit(self, job: Callable[[], None]) -> None:
        while not self._room.acquire(timeout=0.5):
            if self.cancel is not None and self.cancel.is_set():
                raise Cancelled("cancelled")

        def run() -> None:
            try:
                job()  # jobs catch their own errors
            finally:
                self._room.release()

        try:
            future = self._pool.submit(run)
        except BaseException:
            self._room.release()
            raise
        self._futures = [f for f in self._futures if not f.done()]
        self._futures.append(future)

    def close(self, cancel: bool = False) -> None:
        """Wait for the running units (queued ones are dropped when ``cancel``), and give torch its
        thread count back."""
        try:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
        finally:
            torch.set_num_threads(self.saved_torch_threads)  # the workers' setting is also torch's default


class _Closer:
    """Closes (fsyncs) each shard once its last tensor is in, on a thread of its own, so the flush to
    disk overlaps the rest of the work, as in a single run; once only, whichever write finished it."""

    def __init__(self, lock: threading.Lock):
        self._lock = lock
        self._closing: set[int] = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qconvert-fanout-sync")

    def close_complete(self, output: Output, shards: list[ShardFile]) -> None:
        for shard in shards:
            with self._lock:
                if shard.pending or shard.fd < 0 or id(shard) in self._closing:
                    continue
                self._closing.add(id(shard))

            def close(shard: ShardFile = shard) -> None:
                try:
                    shard.close()
                except Exception as exc:
                    _fail(output, exc, self._lock)

            self._pool.submit(close)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


def write_outputs(outputs: list[Output], notice: Notice, advance: Callable[[int], None] | None = None,
                  cancel: threading.Event | None = None, threads: int | None = None) -> int:
    """Write every output; returns the bytes actually read from the input (tensors and copied files).

    ``threads``: compute threads (default :func:`compute_threads`). Failures are recorded in each
    :attr:`Output.error`; only :class:`Cancelled` (and interrupts) escape, after every temporary folder
    is removed.
    """
    advance = advance or (lambda _n: None)
    malloc_policy.for_batch()
    read_bytes = 0
    lock = threading.Lock()  # guards Output.error and shard closing, used from the worker threads too
    try:
        for output in outputs:
            _open(output, notice)
        live = [output for output in outputs if output.error is None]
        schedule = sorted(
            ((_key(unit.inputs[0]), index, seq, unit)
             for index, output in enumerate(outputs) if output.error is None
             for seq, unit in enumerate(output.units)),
            key=lambda item: item[:3],
        )
        remaining: dict[tuple[str, int], int] = {}
        quantizers: dict[tuple[str, int], int] = {}  # units that quantize the tensor as read (one input)
        for *_, unit in schedule:
            for info in unit.inputs:
                remaining[_key(info)] = remaining.get(_key(info), 0) + 1
            if unit.produce is not None and unit.layer is not None and len(unit.inputs) == 1:
                quantizers[_key(unit.inputs[0])] = quantizers.get(_key(unit.inputs[0]), 0) + 1
        shared = {key for key, count in quantizers.items() if count > 1}
        cache: dict[tuple[str, int], torch.Tensor] = {}
        # Copies run on the writer thread with their own reader (descriptors are not shared between threads),
        # and the writer is drained before either reader closes.
        with TensorReader() as reader, TensorReader() as copier:
            writer = _Writer()
            closer = _Closer(lock)
            compute = _Compute(threads or compute_threads(len(live)), cancel)
            failed = True
            try:
                for _, index, _, unit in schedule:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("cancelled")
                    output = outputs[index]
                    if output.error is None:
                        try:
                            read_bytes += _run_unit(unit, output, reader, copier, cache, remaining, shared,
                                                    writer, compute, closer, lock)
                        except (KeyboardInterrupt, Cancelled):
                            raise
                        except Exception as exc:
                            _fail(output, exc, lock)
                    for info in unit.inputs:
                        key = _key(info)
                        remaining[key] -= 1
                        if remaining[key] == 0:
                            cache.pop(key, None)
                    advance(unit.input_bytes)
                failed = False
            finally:
                try:
                    compute.close(cancel=failed)
                finally:
                    writer.close()
                    closer.shutdown()
        for output in outputs:
            read_bytes += _finish(output, notice)
    finally:
        for output in outputs:
            _abandon(output)
    return read_bytes


def _open(output: Output, notice: Notice) -> None:
    try:
        for path in output.checkpoint.unindexed_weight_files:
            notice(f"note: {path.name} is not in the index; it is not part of the model and is not copied")
        layout = layout_shards([unit.outputs for unit in output.units], output.max_shard_bytes)
        output.shards = shard_names(len(layout))
        output._folder = OutputFolder(output.target)
        output._folder.__enter__()
        for name, specs in zip(output.shards, layout, strict=True):
            shard = ShardFile(output._folder.path / name, specs)
            output._shard_files.append(shard)
            output._shard_of.update({spec.name: shard for spec in specs})
        output.bytes_in = sum(unit.input_bytes for unit in output.units) + sum(
            (output.checkpoint.root / rel).stat().st_size for rel in output.checkpoint.other_files)
    except Exception as exc:
        output.error = exc


def _run_unit(unit: Unit, output: Output, reader: TensorReader, copier: TensorReader,
              cache: dict[tuple[str, int], torch.Tensor], remaining: dict[tuple[str, int], int],
              shared: set[tuple[str, int]], writer: _Writer, compute: _Compute, closer: _Closer,
              lock: threading.Lock) -> int:
    """Start one unit of one output; returns the bytes it read from the input. ``copier`` belongs to the
    writer thread. A tensor in ``shared`` (quantized by several outputs) gets its group amaxes computed
    once, here, for all of them (:func:`qconvert.quantizers.share_group_amax`)."""
    read = 0
    if unit.produce is None and remaining[_key(unit.inputs[0])] == 1 and _key(unit.inputs[0]) not in cache:
        info, spec = unit.inputs[0], unit.outputs[0]
        shard = output._shard_of[spec.name]

        def copy() -> None:
            try:
                copier.copy_into(info, shard.fd, shard.position(spec.name))
                shard.mark_written(spec.name)
                closer.close_complete(output, [shard])
            except Exception as exc:
                _fail(output, exc, lock)

        writer.submit(copy)
        return info.nbytes
    tensors = []
    for info in unit.inputs:
        key = _key(info)
        tensor = cache.get(key)
        if tensor is None:
            tensor = reader.read(info)
            read += info.nbytes
            if remaining[key] > 1:
                cache[key] = tensor
            if key in shared:
                share_group_amax(tensor)
        tensors.append(tensor)

    def run() -> None:
        if output.error is not None:
            return  # an earlier unit of this output failed: the output is abandoned
        try:
            produced = {unit.outputs[0].name: tensors[0]} if unit.produce is None else unit.produce(tensors)
            for name, tensor in produced.items():
                output._shard_of[name].write(name, tensor)
            closer.close_complete(output, [output._shard_of[name] for name in produced])
        except Exception as exc:
            _fail(output, exc, lock)

    compute.submit(run)
    return read


def _fail(output: Output, exc: BaseException, lock: threading.Lock) -> None:
    with lock:
        if output.error is None:
            output.error = exc


def _finish(output: Output, notice: Notice) -> int:
    """Close the shards, write index, config and copies, and rename into place; returns bytes copied."""
    if output.error is not None or output._folder is None:
        return 0
    copied = 0
    try:
        folder = output._folder.path
        for shard in output._shard_files:
            if shard.fd >= 0:
                shard.close()  # fsyncs; raises if a planned tensor was never written
        if len(output.shards) > 1:
            write_index(folder, {name: list(shard.specs.values())
                                 for name, shard in zip(output.shards, output._shard_files, strict=True)})
        checkpoint = output.checkpoint
        config = dict(checkpoint.config or {})
        if checkpoint.config is None:
            notice(f"note: {checkpoint.root} has no config.json; writing one with only quantization_config")
        if output.config is None:
            config.pop("quantization_config", None)
        else:
            config["quantization_config"] = output.config
        write_json(folder / "config.json", config)
        for rel in checkpoint.other_files:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(checkpoint.root / rel, folder / rel)
            copied += (checkpoint.root / rel).stat().st_size
        write_model_card(folder, checkpoint.root, config, checkpoint.other_files)  # as write_checkpoint does
        if output.finish is not None:
            output.finish(folder)
        output._folder.commit()
        output._folder = None
    except Exception as exc:
        output.error = exc
    return copied


def _abandon(output: Output) -> None:
    """Close what is still open and remove the temporary folder of an output that did not commit."""
    for shard in output._shard_files:
        shard.abort()
    if output._folder is not None:
        output._folder.abandon()
        output._folder = None
