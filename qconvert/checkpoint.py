"""Finding and opening an input checkpoint: a local folder or a Hugging Face hub id.

Opening reads only headers, the index and config.json; tensor data is read later, one tensor at a
time, through :class:`qconvert.safetensors_io.TensorReader`.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from qconvert.errors import BadInputError
from qconvert.fingerprint import FINGERPRINT_NAME
from qconvert.quant_methods import StoredMethod, packed_tensor, refusal, stored_method, unreadable
from qconvert.safetensors_io import TensorInfo, open_regular, read_header

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

    unlisted: list[str] = field(default_factory=list)  # tensors a shard holds that its index omits
    skipped_files: list[str] = field(default_factory=list)  # notices: extra files not copied, and why
    method: StoredMethod | None = None  # the quantization method its files state (qconvert.quant_methods)
    unreadable: str | None = None  # why qconvert cannot read its weights (only open_checkpoint(describe=True))

    @cached_property
    def other_files(self) -> list[Path]:
        """Files (relative to root) that are not weights, the index or config.json: copied as they are.

        Only regular files that really live inside the model folder are copied (for a hub-cache snapshot,
        inside its repo folder, since the snapshot's files are links into ``../../blobs``): a link that
        leads elsewhere (``tokenizer.json -> ~/.ssh/id_rsa``) would otherwise leak that file into an
        output users publish. Whatever is left out is named in :attr:`skipped_files`."""
        skip = {p.relative_to(self.root) for p in self.weight_files + self.unindexed_weight_files}
        skip |= {Path(INDEX_NAME), Path(CONFIG_NAME)}
        allowed = allowed_root(self.root)
        found, skipped = [], []
        for folder, dirs, files in os.walk(self.root):  # never follows links to folders
            here = Path(folder)
            dirs[:] = sorted(d for d in dirs if not (here == self.root and d in (".git", ".cache")))
            for entry in sorted(files + [d for d in dirs if (here / d).is_symlink()]):
                path = here / entry
                rel = path.relative_to(self.root)
                if rel in skip or rel == Path(FINGERPRINT_NAME):  # batch's record of an output: not model data
                    continue
                if rel == Path(MODELOPT_QUANT_CONFIG):
                    # It states the input's ModelOpt quantization, which an output never keeps (its config.json
                    # says how it is stored); copied, engines would read the output as ModelOpt's.
                    skipped.append(f"note: not copying {rel}: it describes the input's ModelOpt quantization, "
                                   "which the output does not have (config.json says how it is stored)")
                    continue
                problem = _copy_problem(path, allowed)
                if problem:
                    skipped.append(f"note: not copying {rel}: {problem}")
                    continue
                found.append(rel)
            dirs[:] = [d for d in dirs if not (here / d).is_symlink()]
        self.skipped_files[:] = skipped  # shared with copies made by dataclasses.replace: same content
        return found


MODELOPT_QUANT_CONFIG = "hf_quant_config.json"  # ModelOpt's statement of a release's quantization


def allowed_root(root: Path) -> Path:
    """The folder whose files may be copied: the model folder, or a hub-cache repo folder for a snapshot."""
    root = root.resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith(("models--", "datasets--")):
        return root.parent.parent
    return root


def _copy_problem(path: Path, allowed: Path) -> str | None:
    real = Path(os.path.realpath(path))
    if real != allowed and allowed not in real.parents:
        return f"it is a link to {real}, outside the model folder"
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return f"cannot read it ({exc.strerror})"
    if stat.S_ISDIR(mode):
        return "it is a link to a folder"
    if not stat.S_ISREG(mode):
        return "it is not a regular file (a FIFO, socket or device)"
    return None


def require_utf8_name(path: Path, what: str) -> None:
    """Refuse a path that is not valid UTF-8 (legal on Linux, e.g. ``b"out\\xff"``): it cannot be written into
    the summaries, reports and JSON that name it, nor compared with the file system's name limits."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise BadInputError(f"{what} {os.fsencode(path)!r:.200} is not valid UTF-8; give it a UTF-8 name") from None


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


def open_checkpoint(root: Path, describe: bool = False, ours_ok: bool = False) -> Checkpoint:
    """Read the layout of ``root``; every defect becomes a one-line :class:`BadInputError`.

    A checkpoint stored in a quantization method qconvert does not read is refused here, before anything
    else (see :mod:`qconvert.quant_methods`), so that no command copies its packed tensors as if they were
    full precision; with ``describe`` (``inspect``) it is opened and the reason kept in ``unreadable``.
    ``ours_ok``: the per-expert tensors qconvert writes for vLLM are fine (verify and inspect skip them)."""
    config = _read_config(root)
    method = stored_method(root, config)
    why = unreadable(method, config)  # before the headers: a method's own dtypes (F8_E8M0, F4) would fail there
    if why is not None and not describe:
        raise BadInputError(refusal(method, why))  # type: ignore[arg-type]
    checkpoint = _open(root, config)
    if why is None and (found := packed_tensor(list(checkpoint.tensors), ours_ok)) is not None:
        layout, name = found
        info = checkpoint.tensors[name]
        why = f"tensor {name} ({info.file.name}) is in {layout}"
        why += ", and config.json states no quantization" if method is None else ""
        if not describe:
            raise BadInputError(f"{root}: {why}; start from the unquantized (bf16/fp16) release of this model")
    checkpoint.method, checkpoint.unreadable = method, (f"{why}; not readable by qconvert" if why else None)
    return checkpoint


def _read_config(root: Path) -> dict | None:
    config_path = root / CONFIG_NAME
    if os.path.lexists(config_path) and _copy_problem(config_path, allowed_root(root)) and \
            config_path.is_symlink():
        # Its contents go into the output's config.json: a link elsewhere (~/.docker/config.json) would leak.
        raise BadInputError(f"{config_path}: is a link to {os.path.realpath(config_path)}, outside the model "
                            "folder; its contents would be written into the output")
    config = read_json(config_path) if os.path.lexists(config_path) else None
    if config is not None:
        validate_config(config_path, config)
    return config  # type: ignore[return-value]


def _open(root: Path, config: dict | None) -> Checkpoint:
    index_path = root / INDEX_NAME
    top_level = sorted(root.glob("*.safetensors"))
    if os.path.lexists(index_path):
        weight_files, tensors, unlisted = _open_indexed(root, index_path)
        unindexed = [p for p in top_level if p not in weight_files]
        return Checkpoint(root, weight_files, tensors, config, index_path, unindexed, unlisted)
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


def _open_indexed(root: Path, index_path: Path) -> tuple[list[Path], dict[str, TensorInfo], list[str]]:
    index = read_json(index_path)
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
    unlisted: list[str] = []
    for shard in sorted(shards):
        if not os.path.lexists(root / shard):
            raise BadInputError(f"{index_path}: names shard {shard}, which does not exist")
    for shard in sorted(shards):
        path = root / shard
        header = read_header(path)
        for name in shards[shard]:
            if name not in header.tensors:
                raise BadInputError(f"{index_path}: tensor {name} is not in its shard {shard}")
        for name, info in header.tensors.items():
            if name in tensors:
                raise BadInputError(f"{path}: tensor {name} also appears in {tensors[name].file.name}")
            if name in weight_map and weight_map[name] != shard:
                raise BadInputError(f"{path}: tensor {name} is also here, but the index places it in "
                                    f"{weight_map[name]}")
            # A tensor the shard holds but the index omits is still loaded by transformers (it reads
            # every tensor of every shard), so it is part of the model: carried over, and named.
            if name not in weight_map:
                unlisted.append(name)
            tensors[name] = info
        weight_files.append(path)
    return weight_files, tensors, unlisted


_MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_CONFIG_DEPTH = 64  # far beyond any real config; deeper nesting would break json.dumps at the end


def read_json(path: Path) -> object:
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise BadInputError(f"{path}: not valid JSON (nested too deeply)") from None
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{path}: not valid JSON (not UTF-8: {exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path}: not valid JSON ({exc})") from exc
    if _depth(data) > _MAX_CONFIG_DEPTH:
        raise BadInputError(f"{path}: JSON nested more than {_MAX_CONFIG_DEPTH} levels deep")
    return data


def _depth(root: object) -> int:
    deepest, stack = 0, [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= _MAX_CONFIG_DEPTH:
                stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def validate_config(path: Path, config: object) -> None:
    """Check every config field qconvert reads has the type it needs, so a malformed config fails here
    with one line instead of deep inside the run."""
    if not isinstance(config, dict):
        raise BadInputError(f"{path}: not a JSON object")
    for key in ("torch_dtype", "dtype"):
        value = config.get(key)
        if value is None or value == "auto":
            continue
        dtype = getattr(torch, value, None) if isinstance(value, str) else None
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise BadInputError(f"{path}: {key} {value!r:.60} is not a floating-point dtype name (e.g. bfloat16)")
        if dtype not in _MODEL_DTYPES:
            # An fp8 model dtype would have quantized layers rebuilt into fp8 (and written back, unscaled).
            raise BadInputError(f"{path}: {key} {value!r:.60} is not a dtype a model computes in (float16, bfloat16, "
                                "float32); a quantized checkpoint states its full-precision dtype here")
    architectures = config.get("architectures")
    if architectures is not None and not isinstance(architectures, list):
        raise BadInputError(f"{path}: architectures must be a list of names")
    qconfig = config.get("quantization_config")
    if qconfig is None:
        return
    if not isinstance(qconfig, dict):
        raise BadInputError(f"{path}: quantization_config must be a JSON object, not {type(qconfig).__name__}")
    block = qconfig.get("weight_block_size")
    if block is not None and not (isinstance(block, list) and len(block) == 2
                                  and all(type(b) is int and b > 0 for b in block)):
        raise BadInputError(f"{path}: quantization_config.weight_block_size must be two positive integers")
    groups = qconfig.get("config_groups")
    if groups is None:
        return
    if not isinstance(groups, dict):
        raise BadInputError(f"{path}: quantization_config.config_groups must be a JSON object of groups")
    for name, group in groups.items():
        where = f"{path}: quantization_config.config_groups.{name}"
        if not isinstance(group, dict):
            raise BadInputError(f"{where} must be a JSON object")
        targets = group.get("targets")
        if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
            raise BadInputError(f"{where}.targets must be a list of strings")
        for target in targets or []:
            if target.startswith("re:"):
                try:
                    re.compile(target[3:])
                except re.error as exc:
                    raise BadInputError(f"{where}.targets: invalid regular expression {target!r} ({exc})") from exc
        weights = group.get("weights")
        if weights is not None and not isinstance(weights, dict):
            raise BadInputError(f"{where}.weights must be a JSON object")
        if isinstance(weights, dict):
            block = weights.get("block_structure")
            if block is not None and not (isinstance(block, list) and len(block) == 2
                                          and all(type(b) is int and b > 0 for b in block)):
                raise BadInputError(f"{where}.weights.block_structure must be two positive integers")
            bits = weights.get("num_bits")
            if bits is not None and not (type(bits) is int and bits > 0):
                raise BadInputError(f"{where}.weights.num_bits {bits!r:.40} is not a positive integer")
            strategy = weights.get("strategy")
            if strategy is not None and not isinstance(strategy, str):
                raise BadInputError(f"{where}.weights.strategy {strategy!r:.40} is not a string")
