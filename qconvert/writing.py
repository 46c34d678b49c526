"""Writing an output checkpoint: shard layout, the index, and the temporary folder that becomes the
output only once everything in it is complete and on disk."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from qconvert.errors import BadInputError
from qconvert.safetensors_io import TensorSpec

INDEX_NAME = "model.safetensors.index.json"


def check_output_location(source: Path, target: Path, overwrite: bool) -> None:
    """Refuse outputs that would touch the input or silently replace existing work."""
    source, target = source.resolve(), target.resolve()
    if target == source or source in target.parents:
        raise BadInputError(f"{target}: the output cannot be the input folder or inside it")
    if target in source.parents:
        raise BadInputError(f"{target}: the output cannot contain the input folder {source}")
    if target.exists() and not target.is_dir():
        raise BadInputError(f"{target}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise BadInputError(f"{target}: exists and is not empty (pass --overwrite to replace it)")


class OutputFolder:
    """A temporary folder beside ``target``, renamed onto it by :meth:`commit`.

    Until the rename, nothing exists at ``target`` that looks like a finished checkpoint; any
    exception (or Ctrl-C) inside the ``with`` block removes the temporary folder. An existing
    ``target`` (with ``--overwrite``) is only removed after the new folder has taken its place.
    """

    def __init__(self, target: Path):
        self.target = target.resolve()
        stem = f".{self.target.name}.qconvert-{os.getpid()}"
        self.path = self.target.parent / f"{stem}.partial"
        self._retired = self.target.parent / f"{stem}.old"

    def __enter__(self) -> OutputFolder:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir()
        except OSError as exc:
            raise BadInputError(f"{self.target}: cannot create the output there ({exc.strerror})") from exc
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> None:
        if self.target.exists():
            self.target.rename(self._retired)
            self.path.rename(self.target)
            shutil.rmtree(self._retired, ignore_errors=True)
        else:
            self.path.rename(self.target)
        _fsync_dir(self.target.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def layout_shards(units: list[list[TensorSpec]], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Fill shards in input order; the tensors of one unit (one quantized layer) stay together."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for unit in units:
        unit_bytes = sum(spec.nbytes for spec in unit)
        if shards[-1] and size + unit_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(unit)
        size += unit_bytes
    return shards


def write_index(folder: Path, shards: dict[str, list[TensorSpec]]) -> None:
    weight_map = {spec.name: name for name, specs in shards.items() for spec in specs}
    total = sum(spec.nbytes for specs in shards.values() for spec in specs)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(folder / INDEX_NAME, index)


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def parse_size(text: str) -> int:
    """``5GB`` → 5_000_000_000, ``500MiB`` → 524_288_000, ``123`` → 123 (bytes)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise BadInputError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    return int(value * units[unit])
