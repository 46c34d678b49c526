"""Errors the CLI turns into one line and an exit code (documented in the README)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3  # verify only: the checker itself crashed, as distinct from a check that failed (1)


class QConvertError(Exception):
    """A failure we can explain in one line; anything else is reported as unexpected."""

    exit_code = EXIT_FAILURE


class BadInputError(QConvertError):
    """The input, an option, or the output location is wrong: the user can fix it."""

    exit_code = EXIT_BAD_INPUT


_LINE_BREAKERS = {"\u2028", "\u2029", "\x85"}


def one_line(text: str) -> str:
    """``text`` safe to print as one terminal line: control characters (newlines, ANSI escapes, and what
    ``str.splitlines`` splits on) are written as escapes, so a hostile tensor name can neither break the
    one-line promise nor drive the terminal."""
    import unicodedata

    def escape(char: str) -> str:
        if char in _LINE_BREAKERS or unicodedata.category(char) == "Cc":
            code = ord(char)
            return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
        return char

    return "".join(map(escape, text))
