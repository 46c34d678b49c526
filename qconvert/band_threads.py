"""Running the search's bands of rows on several CPU threads at once, each with one intra-op thread.

The search (qconvert.algorithms) costs some fifty element-wise passes per parameter, each over a band of half a
million elements. torch splits every such pass over its intra-op threads, and on a small machine the fork and join
of every pass costs about what the split saves: on the 2-core VM, a bf16 5632 x 2048 matrix's int4 search took
0.46 s on one thread, 0.39 s on two intra-op threads, and 0.23 s as two bands at a time on two threads of one
intra-op thread each (python benchmarks/algorithm_speed.py measures the whole run). The bands are independent:
each reads its own rows and writes its own rows of outputs allocated beforehand, with the same arithmetic
whichever thread runs it, so the bytes written do not depend on the threads.

The pool is the process's, made once with as many threads as torch's intra-op count at that time, and each of its
threads is set to one intra-op thread when it starts. ``torch.set_num_threads`` also changes the count that threads
started later begin with, so the pool starts all its threads at once and then puts the count back.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch

__all__ = ["run_bands", "thread_buffer"]


class _BandPool:
    """Daemon threads of one intra-op thread each, serving bands from one queue. Daemons, so that an idle pool
    never holds up the end of the process (``qconvert``'s exit waits for any other thread still running)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._tasks: queue.SimpleQueue[tuple[Future[None], Callable[[int], None], int]] = queue.SimpleQueue()
        count = torch.get_num_threads()
        started = threading.Barrier(threads + 1)
        for index in range(threads):
            threading.Thread(target=self._serve, args=(started,), name=f"qconvert-band-{index}", daemon=True).start()
        started.wait()  # every thread has set its count: now put back the count that later threads start with
        torch.set_num_threads(count)

    def submit(self, work: Callable[[int], None], start: int) -> Future[None]:
        future: Future[None] = Future()
        self._tasks.put((future, work, start))
        return future

    def _serve(self, started: threading.Barrier) -> None:
        torch.get_num_threads()  # torch sets a thread's count on its first use: before ours, not after
        torch.set_num_threads(1)
        started.wait()
        while True:
            future, work, start = self._tasks.get()
            try:
                work(start)
            except BaseException as exc:  # handed to the caller, which raises it
                future.set_exception(exc)
            else:
                future.set_result(None)
            # Drop the band's closure before waiting for the next: it holds the tensor and its outputs, which
            # would otherwise stay alive (and resident) until this thread's next band, a whole tensor later.
            del future, work, start


_lock = threading.Lock()
_pool: _BandPool | None = None


def _band_pool() -> _BandPool | None:
    """The process's band pool, made on first use; None where torch runs on one intra-op thread."""
    global _pool
    with _lock:
        if _pool is None and torch.get_num_threads() >= 2:
            _pool = _BandPool(torch.get_num_threads())
        return _pool


def run_bands(work: Callable[[int], None], starts: Sequence[int], device: torch.device, threaded: bool = True
              ) -> None:
    """``work(start)`` for each band start: in order on this thread without ``threaded`` (RTN's passes, which
    torch's intra-op threads split well enough), on a GPU (whose kernels are queued in order on one stream) or for a
    single band, else on the band pool, a band per thread at a time. Returns when all are done; the first band to
    fail raises its error here (the others still finish, none is left running)."""
    pool = _band_pool() if threaded and device.type == "cpu" and len(starts) > 1 else None
    if pool is None:
        for start in starts:
            work(start)
        return
    futures = [pool.submit(work, start) for start in starts]
    for future in futures:
        future.exception()  # wait for every band before raising any error
    for future in futures:
        future.result()


_buffers = threading.local()


def thread_buffer(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised ``shape`` buffer of the calling thread, for the band it is working on. On the CPU, the same
    memory band after band (one per slot and dtype, grown when a band needs more): glibc hands a freed block of a
    few MiB at the top of a thread's arena back to the kernel, so a fresh one per band is faulted in page by page
    again (measured on 2 cores, int4-asym search of the 1.7 GB checkpoint: 2.6 million page faults and 13.6 s of
    system time, against 0.26 million and 2 s for its RTN). The caller uses it before its next request for the same
    slot: nothing kept beyond a band may be a view of it."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)  # the caching allocator already reuses blocks
    numel = math.prod(shape)
    held: dict[tuple[str, torch.dtype], torch.Tensor] = _buffers.__dict__.setdefault("held", {})
    buffer = held.get((slot, dtype))
    if buffer is None or buffer.numel() < numel:
        buffer = held[(slot, dtype)] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)
