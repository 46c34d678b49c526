"""qconvert: stream LLM checkpoints into quantized compressed-tensors checkpoints."""

__version__ = "0.1.0"

# True in the ``qconvert`` command's own process (``qconvert ...`` or ``python -m qconvert``), never in a
# program that imports qconvert: only then may the CLI change process-wide settings (see cli.main).
AS_COMMAND = False


def _command_starting() -> None:
    """Set up the ``qconvert`` command's process before it imports its libraries.

    Ctrl-C, SIGTERM or SIGHUP while it is still importing would print a traceback from inside an import:
    nothing is open or written yet, so one line and exit 1 (the CLI's own handlers replace these once
    it runs). The cyclic garbage collector is paused: importing torch finds no garbage for it, yet runs
    it hundreds of times over a growing heap, about a tenth of the import's 1.5-3 s; ``cli.main``
    freezes what was imported and turns it back on. And a command that will use a GPU starts creating
    its CUDA context meanwhile (:mod:`qconvert.early_cuda`).

    Only for the command itself: ``python -m qconvert`` imports this package while ``sys.argv[0]`` is
    still ``-m``.
    """
    import gc
    import os
    import signal
    import sys

    global AS_COMMAND
    command = os.path.basename(sys.argv[0]) if sys.argv else ""
    if command not in ("qconvert", "-m") and not command.endswith("__main__.py"):
        return
    if command.endswith("__main__.py") and os.path.basename(os.path.dirname(sys.argv[0])) != "qconvert":
        return
    AS_COMMAND = True

    def interrupted(_signum: int, _frame: object) -> None:
        os.write(2, b"error: interrupted while starting; nothing was written\n")
        os._exit(1)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    gc.disable()
    from qconvert import early_cuda

    early_cuda.start(sys.argv[1:])


_command_starting()
