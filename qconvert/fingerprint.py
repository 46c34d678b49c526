"""What an output was made from, recorded inside it, so that a rerun of ``batch`` can skip it.

A fingerprint is the digest of: every input file's relative name, size and identity, the options that
decide the output's bytes, and the qconvert version. A file's identity is its modification time, or,
for a hub-cache file (a symlink into ``blobs/``), the blob's name, which is the content's hash: a
hub snapshot downloaded again is still recognised, a local file rewritten in place is not mistaken
for the old one. Reading whole inputs to hash them would cost as much as converting them.

The record also lists the output's own files and sizes, so an output damaged after it was written
(a shard deleted or truncated) is rebuilt rather than skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FINGERPRINT_NAME = ".qconvert-fingerprint.json"
FORMAT_VERSION = 1


def input_files(source: Path) -> list[list[object]]:
    """``[name, size, identity]`` for every file of an input folder (sorted, like the copy rules)."""
    entries: list[list[object]] = []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if rel.parts[0] in (".git", ".cache") or rel == Path(FINGERPRINT_NAME) or not path.is_file():
            continue
        stat = path.stat()  # follows hub-cache symlinks to their blobs
        identity: object = stat.st_mtime_ns
        if path.is_symlink():
            target = Path(os.readlink(path))
            if target.parent.name == "blobs":
                identity = f"blob:{target.name}"
        entries.append([str(rel), stat.st_size, identity])
    return entries


def digest(files: list[list[object]], options: dict, version: str) -> str:
    canonical = json.dumps({"files": files, "options": options, "qconvert": version, "format": FORMAT_VERSION},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# qconvert's own bookkeeping in an output folder: not part of what the output is.
# The others: --resume's journal and the run's lock file in its partial folder, gone after the rename.
_BOOKKEEPING = (FINGERPRINT_NAME, ".qconvert-journal.json", ".qconvert-owner.lock")


def output_files(folder: Path) -> list[list[object]]:
    return [[str(p.relative_to(folder)), p.stat().st_size] for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in _BOOKKEEPING]


def write_fingerprint(folder: Path, key: str, model: str, options: dict, version: str) -> None:
    """Record ``key`` in a finished (not yet renamed) output folder; written last, after every other file."""
    record = {"digest": key, "format": FORMAT_VERSION, "qconvert_version": version, "model": model,
              "options": options, "outputs": output_files(folder)}
    (folder / FINGERPRINT_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_fingerprint(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / FINGERPRINT_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def is_up_to_date(folder: Path, key: str) -> bool:
    """True when ``folder`` was written by batch from the same inputs and options, and is intact."""
    record = read_fingerprint(folder)
    if record is None or record.get("digest") != key:
        return False
    try:
        return output_files(folder) == record.get("outputs")
    except OSError:
        return False
