"""qconvert: stream LLM checkpoints into quantized compressed-tensors checkpoints."""

__version__ = "0.1.0"


def _quiet_early_interrupts() -> None:
    """Ctrl-C, SIGTERM or SIGHUP while the ``qconvert`` command is still importing its libraries would
    print a traceback from inside an import: nothing is open or written yet, so one line and exit 1.
    Only for the command itself (``qconvert ...`` or ``python -m qconvert``, which imports this package
    while ``sys.argv[0]`` is still ``-m``), never for a program that imports qconvert; the CLI's own
    handlers replace these once it runs."""
    import os
    import signal
    import sys

    command = os.path.basename(sys.argv[0]) if sys.argv else ""
    if command not in ("qconvert", "-m") and not command.endswith("__main__.py"):
        return
    if command.endswith("__main__.py") and os.path.basename(os.path.dirname(sys.argv[0])) != "qconvert":
        return

    def interrupted(_signum: int, _frame: object) -> None:
        os.write(2, b"error: interrupted while starting; nothing was written\n")
        os._exit(1)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)


_quiet_early_interrupts()
