"""Errors the CLI turns into one line and an exit code (documented in the README)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


class QConvertError(Exception):
    """A failure we can explain in one line; anything else is reported as unexpected."""

    exit_code = EXIT_FAILURE


class BadInputError(QConvertError):
    """The input, an option, or the output location is wrong: the user can fix it."""

    exit_code = EXIT_BAD_INPUT
