"""Parsing option values shared by the commands (``quantize``, ``convert``) and ``batch`` job files."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from qconvert.errors import BadInputError
    from qconvert.pipeline import QuantizeRequest

T = TypeVar("T")


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


# The ``quantize`` command's parameters (by their names in the command function) and their defaults: the one
# place both ``qconvert quantize`` and a ``batch`` job turn option values into a QuantizeRequest.
QUANTIZE_DEFAULTS: dict[str, object] = {
    "scheme": "rtn4", "output": None, "group_size": None, "ignore": None, "targets": None, "override": None,
    "overrides_file": None, "layout": "compressed-tensors", "fuse": None, "max_shard_size": "5GB",
    "overwrite": False, "revision": None, "dry_run": False, "allow_requantize": False, "fnuz": False,
    "force_layout": False, "show_progress": True, "resume": False, "include_vision": False,
    "keep_fused_experts": False, "min_coverage": None, "device": "auto", "workers": None, "algorithm": "rtn",
}


def quantize_request(model: str, params: dict[str, object], *, check_device: bool = True,
                     blame: Callable[[str, BadInputError], Exception] | None = None) -> QuantizeRequest:
    """The request ``qconvert quantize`` runs, from its parameters (missing ones take the command's defaults),
    every value checked before any file is read: the scheme, overrides, fusion regexes, shard size, layout,
    device and workers, the coverage floor and the module patterns. ``blame(param, error)`` turns a refusal
    into the caller's error (batch names the job and key); by default the error is raised as it is.
    ``check_device=False`` checks ``device`` by its spelling only (Ray workers, not this machine, run it)."""
    from qconvert.errors import BadInputError
    from qconvert.pipeline import QuantizeRequest, check_request
    from qconvert.schemes import get_scheme
    from qconvert.writing import parse_size

    unknown = set(params) - set(QUANTIZE_DEFAULTS)
    if unknown:
        raise TypeError(f"not quantize parameters: {sorted(unknown)}")
    p = {**QUANTIZE_DEFAULTS, **params}

    def step(param: str, convert: Callable[[], T]) -> T:
        try:
            return convert()
        except BadInputError as exc:
            if blame is None:
                raise
            raise blame(param, exc) from None

    override = list(p["override"] or [])  # type: ignore[call-overload]
    request = QuantizeRequest(
        model=model,
        scheme=step("algorithm" if p["algorithm"] != "rtn" else "group_size" if p["group_size"] is not None
                    else "scheme", lambda: get_scheme(p["scheme"], p["group_size"], p["algorithm"])),  # type: ignore
        output=p["output"],  # type: ignore[arg-type]
        ignore=list(p["ignore"] or []),  # type: ignore[call-overload]
        targets=list(p["targets"] or []),  # type: ignore[call-overload]
        overrides=step("override" if override else "overrides_file",
                       lambda: parse_overrides(override, p["overrides_file"], p["algorithm"])),  # type: ignore
        fused_patterns=step("fuse", lambda: fuse_patterns(list(p["fuse"])) if p["fuse"] else None),  # type: ignore
        layout=p["layout"],  # type: ignore[arg-type]
        max_shard_bytes=step("max_shard_size", lambda: parse_size(p["max_shard_size"])),  # type: ignore[arg-type]
        overwrite=bool(p["overwrite"]), revision=p["revision"], dry_run=bool(p["dry_run"]),  # type: ignore[arg-type]
        allow_requantize=bool(p["allow_requantize"]), fnuz=bool(p["fnuz"]), force_layout=bool(p["force_layout"]),
        show_progress=bool(p["show_progress"]), resume=bool(p["resume"]),
        include_vision=bool(p["include_vision"]), keep_fused_experts=bool(p["keep_fused_experts"]),
        min_coverage=p["min_coverage"], device=p["device"], workers=p["workers"],  # type: ignore[arg-type]
    )
    check_request(request, check_device=check_device, blame=blame)
    return request
