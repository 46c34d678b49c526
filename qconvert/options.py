"""Parsing option values shared by the commands (``quantize``, ``convert``) and ``batch`` job files."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def parse_overrides(items: list[str], file: Path | None, algorithm: str = "rtn") -> list[tuple[str, object]]:
    """``PATTERN=SCHEME`` pairs, from the command line first, then the file (one per line, # comments).

    ``SCHEME:ALGORITHM`` (``rtn4:search``) picks the algorithm for those modules; without one, a scheme takes the
    run's ``algorithm`` where that applies to it, else rtn (``--algorithm search`` with an fp8 override)."""
    from qconvert.errors import BadInputError
    from qconvert.schemes import get_scheme

    lines = list(items)
    if file is not None:
        from qconvert.safetensors_io import open_regular

        try:
            with os.fdopen(open_regular(file), "rb") as f:
                text = f.read().decode("utf-8")
        except OSError as exc:
            raise BadInputError(f"{file}: cannot read overrides ({exc.strerror})") from exc
        except UnicodeDecodeError as exc:
            raise BadInputError(f"{file}: overrides file is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        lines += [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    overrides = []
    for line in filter(None, lines):
        pattern, sep, name = line.rpartition("=")
        if not sep or not pattern.strip() or not name.strip():
            raise BadInputError(f"--override {line!r}: expected PATTERN=SCHEME (SCHEME may be 'none')")
        name, colon, chosen = name.strip().partition(":")
        if name == "none":
            overrides.append((pattern.strip(), None))
            continue
        if colon:
            scheme = get_scheme(name, algorithm=chosen)
        else:
            scheme = get_scheme(name)
            with contextlib.suppress(BadInputError):  # the run's algorithm has no candidates for this scheme: rtn
                scheme = scheme.with_algorithm(algorithm)
        overrides.append((pattern.strip(), scheme))
    return overrides


def fuse_patterns(patterns: list[str]) -> list[str]:
    import re

    from qconvert.errors import BadInputError

    for pattern in patterns:
        try:
            groups = re.compile(pattern).groups
        except re.error as exc:
            raise BadInputError(f"--fuse {pattern!r}: invalid regular expression ({exc})") from exc
        if groups < 1:
            raise BadInputError(f"--fuse {pattern!r}: needs a capture group naming the fused module")
    return patterns
