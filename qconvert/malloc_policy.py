"""How glibc's malloc serves tensor-sized blocks in this process: one policy per kind of run (glibc on
Linux only; elsewhere, or on musl, which has no ``mallopt``, nothing changes).

Two policies, each measured on the 2-core VM:

- :func:`for_batch`: batch's compute threads reuse buffers (``fanout``).
- :func:`for_engine_on_cpu`: a single run on the CPU keeps a bounded, steady peak (``engine``), and
  :class:`FreePages` hands the free pages inside the arenas back as the run goes.

Batch's policy wins over the engine's, whichever asked first.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_chosen: str | None = None


def for_batch() -> None:
    """Keep tensor-sized buffers in malloc's arenas instead of fresh mmaps.

    By default glibc serves a block above a dynamic threshold (128 KiB at first) from its own mmap and
    returns freed memory at the top of an arena to the kernel, so every input read, temporary and output
    of the compute threads is faulted in page by page again (measured: about 2.7x the page faults of
    this setting and ~0.5 s of system time per 1.7 GB read). Blocks up to 32 MiB (a thread's arena
    grows in heaps of 64 MiB) now come from the arenas, which keep up to 128 MiB free each; larger ones
    are still mapped and unmapped. What is in flight stays bounded as before; RSS may stay up to that
    much higher per arena after a peak.
    """
    _choose("batch", {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 128 << 20})


def for_engine_on_cpu() -> None:
    """A fixed 32 MiB threshold above which glibc maps each block on its own.

    glibc's default threshold moves: it rises to the size of the last large block freed (up to 32 MiB)
    and lets every arena keep twice that free at its top. The reader, main and writer threads each
    allocate from an arena of their own, so RSS drifted with the order of allocations: 498-640 MiB peak
    for rtn4 on the 1.67 GB checkpoint on 2 cores. A fixed threshold keeps the same blocks mapped and
    the default trimming: 512-533 MiB over seven runs, at the same speed
    (``benchmarks/results/cpu-malloc-threshold-2core-s4.txt``).
    """
    _choose("engine", {_M_MMAP_THRESHOLD: 32 << 20})


class FreePages:
    """Under the engine's policy, ``malloc_trim(0)`` once every ``interval`` bytes of inputs computed: the pages of
    free blocks *inside* malloc's arenas go back to the kernel (glibc's own trimming only returns a free top).

    The reader threads allocate the inputs from their arenas, the main thread frees them after computing, the
    writers free the outputs: at the peak of an int8-asym search of the 1.67 GB checkpoint on 2 cores the arenas
    held 184-199 MiB of free blocks, resident, next to 147-182 MiB in use (``mallinfo2``). Trimming once per
    in-flight budget of inputs (128 MiB on 2 cores), whole processes alternating there: peak RSS 519-540 -> 448-457
    MiB at no measurable cost in wall time (every half budget: 421-443 MiB, perhaps 5% slower). For rtn4, trimming
    every half budget saved about 100 MiB but cost 5-10% of its wall time (the freed pages are faulted in again by
    the next reads: 0.6-0.8 s more system time), so only runs whose compute outweighs that
    (``ExecutionSettings.free_pages``: the search) use it. Not under batch's policy, which keeps free blocks on
    purpose."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self._since = 0

    def freed(self, nbytes: int) -> None:
        if _chosen != "engine":
            return
        self._since += nbytes
        if self._since >= self.interval:
            self._since = 0
            _malloc_trim()


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)


def chosen() -> str | None:
    """The policy this process runs with ("batch", "engine"), or None (glibc's defaults)."""
    return _chosen


def _choose(name: str, settings: dict[int, int]) -> None:
    global _chosen
    if _chosen in (name, "batch") or not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return  # not glibc
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for parameter, value in settings.items():
        mallopt(parameter, value)
    _chosen = name
