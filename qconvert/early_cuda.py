"""Start the CUDA driver while the ``qconvert`` command is still importing torch.

Creating a GPU's CUDA context takes 0.3-0.4 s (``cuInit`` and the device's primary context). torch does
it the first time a tensor goes to the GPU, after its own import (1.5-4 s), and the engine then waits for
it. Through the driver API (``libcuda``, no torch needed) the same primary context can be created on a
background thread from the command's first line, while the import runs on the main thread: ctypes lets
go of the GIL during the calls. torch's CUDA runtime later finds the primary context created and only
attaches to it, so nothing about the run changes but its start.

Only for commands that will put tensors on a GPU in this process (``quantize``, ``convert``, ``batch``
without ``--device cpu``, ``--dry-run``, ``--help`` or, for ``batch``, ``--ray``), only where
``libcuda`` loads; any failure leaves it all to torch as before. ``QCONVERT_EARLY_CUDA=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading

GPU_COMMANDS = ("quantize", "convert", "batch")
# cpu, cuda or cuda:N with ASCII digits only (int() also takes "٣"; torch does not), at most 9 of them so that
# N fits every integer it meets (a C int here; torch wraps indices above 127, so callers compare N with the count).
_DEVICE = re.compile(r"(cpu|cuda)(?::([0-9]{1,9}))?")


def parse_device(text: str) -> tuple[str, int | None] | None:
    """``(kind, index)`` of a ``--device`` value (``auto`` aside), or None when it is not one."""
    match = _DEVICE.fullmatch(text.strip().lower())
    if match is None or (match[1] == "cpu" and match[2] is not None):
        return None
    return match[1], (int(match[2]) if match[2] is not None else None)


def gpu_ordinal(args: list[str]) -> int | None:
    """The GPU a command line will use (N of ``--device cuda:N``, else 0), or None if it will not use one
    (another command, ``--device cpu``, a dry run, help) as far as the arguments tell."""
    if not args or args[0] not in GPU_COMMANDS:
        return None
    if any(arg in ("--dry-run", "--help", "-h") for arg in args):
        return None
    if args[0] == "batch" and any(arg == "--ray" or arg.startswith("--ray=") for arg in args):
        return None  # the jobs run in Ray's worker processes
    device = "auto"
    for index, arg in enumerate(args):
        if arg == "--device" and index + 1 < len(args):
            device = args[index + 1]
        elif arg.startswith("--device="):
            device = arg.split("=", 1)[1]
    if device.strip().lower() == "auto":
        return 0
    parsed = parse_device(device)
    if parsed is None or parsed[0] != "cuda":
        return None  # cpu, or a value the command itself refuses with one line
    return parsed[1] or 0


def _retain_primary_context(ordinal: int) -> None:
    try:
        _retain(ordinal)
    except Exception:
        return


def _retain(ordinal: int) -> None:
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return  # no NVIDIA driver: nothing to start
    device, context = ctypes.c_int(), ctypes.c_void_p()
    if driver.cuInit(0) != 0 or driver.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
        return
    # Retained for the life of the process (never released): torch's runtime uses this same context.
    driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), device)


def start(args: list[str]) -> threading.Thread | None:
    """Begin creating the CUDA context for ``args``'s GPU on a background thread, if it will use one."""
    if os.environ.get("QCONVERT_EARLY_CUDA") == "0":
        return None
    ordinal = gpu_ordinal(args)
    if ordinal is None:
        return None
    # Not a daemon: a process that ends (say on bad input) waits for the driver call to return rather than
    # tearing the driver down under it.
    thread = threading.Thread(target=_retain_primary_context, args=(ordinal,), name="qconvert-early-cuda")
    thread.start()
    return thread
