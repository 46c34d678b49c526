"""Finding and opening an input checkpoint: a local folder or a Hugging Face hub id.

Opening reads only headers, the index and config.json; tensor data is read later, one tensor at a
time, through :class:`qconvert.safetensors_io.TensorReader`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from qconvert.errors import BadInputError
from qconvert.fingerprint import FINGERPRINT_NAME
from qconvert.safetensors_io import TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

# Weight formats we never read; a hub download skips them so only the needed bytes travel.
HUB_IGNORE_PATTERNS = [
    "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.gguf",
    "*.tflite", "*.ot", "*.mlmodel", "*.pb", "consolidated*.safetensors", "original/*", "onnx/*",
    "openvino/*", "coreml/*", "tf_model*", "flax_model*", "rust_model*",
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass
class Checkpoint:
    """A safetensors checkpoint: its weight files, their tensors (in data order) and its config."""

    root: Path
    weight_files: list[Path]
    tensors: dict[str, TensorInfo]
    config: dict | None
    index_file: Path | None = None
    unindexed_weight_files: list[Path] = field(default_factory=list)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @cached_property
    def other_files(self) -> list[Path]:
        """Files (relative to root) that are not weights, the index or config.json: copied as they are."""
        skip = {p.relative_to(self.root) for p in self.weight_files + self.unindexed_weight_files}
        skip |= {Path(INDEX_NAME), Path(CONFIG_NAME)}
        found = []
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root)
            if rel.parts[0] in (".git", ".cache") or rel in skip or not path.is_file():
                continue
            if rel == Path(FINGERPRINT_NAME):  # batch's record of how an output was made: not model data
                continue
            found.append(rel)
        return found


def resolve_source(model: str, revision: str | None = None) -> Path:
    """A local folder as given, or the snapshot folder of a hub id (downloaded or from the cache)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BadInputError(f"{model}: not a folder (point qconvert at the model's folder)")
        return path.resolve()
    if model.startswith((".", "/", "~")) or not _HUB_ID.match(model):
        raise BadInputError(f"{model}: no such folder")
    return _download(model, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id, revision=revision, ignore_patterns=HUB_IGNORE_PATTERNS,
        )
    except LocalEntryNotFoundError as exc:
        raise BadInputError(
            f"{repo_id}: no such folder, and not in the local hub cache "
            f"(offline, or the hub cannot be reached: {str(exc).splitlines()[0]})"
        ) from exc
    except HfHubHTTPError as exc:
        raise BadInputError(f"{repo_id}: hub download failed: {str(exc).splitlines()[0]}") from exc
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{repo_id}: cannot be resolved as a folder or hub id: {exc}") from exc
    return Path(folder).resolve()


def open_checkpoint(root: Path) -> Checkpoint:
    """Read the layout of ``root``; every defect becomes a one-line :class:`BadInputError`."""
    config = _read_json(root / CONFIG_NAME) if (root / CONFIG_NAME).is_file() else None
    if config is not None and not isinstance(config, dict):
        raise BadInputError(f"{root / CONFIG_NAME}: not a JSON object")
    index_path = root / INDEX_NAME
    top_level = sorted(root.glob("*.safetensors"))
    if index_path.is_file():
        weight_files, tensors = _open_indexed(root, index_path)
        unindexed = [p for p in top_level if p not in weight_files]
        return Checkpoint(root, weight_files, tensors, config, index_path, unindexed)
    if not top_level:
        others = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = f" (found {', '.join(others[:3])}: only safetensors weights are read)" if others else ""
        raise BadInputError(f"{root}: no *.safetensors weights{hint}")
    tensors: dict[str, TensorInfo] = {}
    for path in top_level:
        for name, info in read_header(path).tensors.items():
            if name in tensors:
                raise BadInputError(f"{path}: tensor {name} also appears in {tensors[name].file.name}")
            tensors[name] = info
    return Checkpoint(root, top_level, tensors, config)


def _open_indexed(root: Path, index_path: Path) -> tuple[list[Path], dict[str, TensorInfo]]:
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BadInputError(f"{index_path}: no weight_map")
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise BadInputError(f"{index_path}: tensor {name} maps to an invalid shard name {shard!r}")
        shards.setdefault(shard, []).append(name)
    weight_files: list[Path] = []
    tensors: dict[str, TensorInfo] = {}
    for shard in sorted(shards):
        path = root / shard
        if not path.is_file():
            raise BadInputError(f"{index_path}: names shard {shard}, which does not exist")
        header = read_header(path)
        for name in shards[shard]:
            if name not in header.tensors:
                raise BadInputError(f"{index_path}: tensor {name} is not in its shard {shard}")
        for name, info in header.tensors.items():
            if name in tensors:
                raise BadInputError(f"{path}: tensor {name} also appears in {tensors[name].file.name}")
            # Tensors a shard holds but the index omits are invisible to loaders; so they are to us.
            if weight_map.get(name) == shard:
                tensors[name] = info
        weight_files.append(path)
    return weight_files, tensors


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path}: not valid JSON ({exc})") from exc
