"""Everything a run needs, checked before any output is written; and the hooks that make a run resumable.

A bad input must fail in the first second with one line, not after the work: the plan's weights, the
output's tensor names, the files to copy and the free space are all known before the first tensor is
read, so they are checked here. The resume hooks tie the writer to :class:`qconvert.writing.OutputFolder`'s
journal: each shard is read back and checksummed as it is finished, and a resumed run skips the units
whose shard an earlier run already finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from qconvert import __version__
from qconvert.checkpoint import CONFIG_NAME, INDEX_NAME, Checkpoint
from qconvert.errors import BadInputError
from qconvert.planning import Plan, module_of
from qconvert.progress import Progress
from qconvert.safetensors_io import ShardFile, TensorInfo, TensorSpec, open_regular, shard_regions
from qconvert.sources import StoredLayer
from qconvert.units import Unit
from qconvert.writing import OutputFolder, check_shard

Notice = Callable[[str], None]
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)


def check_plan(plan: Plan, view: dict[str, TensorInfo], stored: dict[str, StoredLayer]) -> None:
    """Weights the plan would quantize but cannot: empty ones, and fp8 values with no scale to read them by."""
    for name in plan.quantize:
        info = view[name]
        module = module_of(name)
        if 0 in info.shape:
            raise BadInputError(f"{info.file.name}: tensor {name} has shape {list(info.shape)}; an empty weight "
                                f"cannot be quantized (leave it as it is with --ignore {module})")
        if info.dtype in _FP8 and module not in stored:
            raise BadInputError(f"{info.file.name}: tensor {name} is {str(info.dtype).removeprefix('torch.')} but "
                                f"has no weight_scale or weight_scale_inv, so its real values are unknown")


def preflight_output(checkpoint: Checkpoint, units: list[Unit], target: Path, layout: list[list[TensorSpec]],
                     other_files: list[Path], notice: Notice) -> None:
    """Check the output can be written as planned; say what is carried over or left out."""
    if checkpoint.unlisted:
        notice(f"note: {len(checkpoint.unlisted)} tensors are in a shard but not in its index (e.g. "
               f"{checkpoint.unlisted[0]}); transformers loads them, so they are written and indexed")
    for line in checkpoint.skipped_files:
        notice(line)
    check_output_plan(checkpoint, units, target, layout, other_files)


def check_output_plan(checkpoint: Checkpoint, units: list[Unit], target: Path, layout: list[list[TensorSpec]],
                      other_files: list[Path], space: bool = True) -> int:
    """The output's tensor names (no stray tensor under a name quantization writes), the files to copy
    (readable, no collision) and, with ``space``, the free space; returns the bytes the output takes."""
    _check_names(units)
    planned = {Path(INDEX_NAME), Path(CONFIG_NAME)}
    for rel in other_files:
        if rel in planned or (len(rel.parts) == 1 and rel.suffix == ".safetensors"):
            raise BadInputError(f"{checkpoint.root / rel}: would collide with a file qconvert writes")
        os.close(open_regular(checkpoint.root / rel))  # unreadable: refuse now, not after the work
    needed = sum(spec.nbytes for specs in layout for spec in specs)
    needed += sum((checkpoint.root / rel).stat().st_size for rel in other_files)
    if space:
        _check_space(target, needed)
    return needed


def check_space_for(outputs: list[tuple[Path, int]]) -> None:
    """Free space for several outputs written in one run (``batch``): the bytes of all outputs that land on
    one file system against its free space, before any of them is written."""
    by_device: dict[int, list[tuple[Path, int]]] = {}
    for target, needed in outputs:
        by_device.setdefault(_device_of(target), []).append((target, needed))
    for group in by_device.values():
        if len(group) > 1:
            total = sum(needed for _, needed in group)
            _check_space(group[0][0], total, f" (with {len(group) - 1} other outputs of this batch on it)")


def _device_of(target: Path) -> int:
    place = Path(os.path.abspath(target)).parent
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        return place.stat().st_dev
    except OSError:
        return -1


def _check_names(units: list[Unit]) -> None:
    counts = Counter(spec.name for unit in units for spec in unit.outputs)
    clashes = sorted(name for name, count in counts.items() if count > 1)
    if not clashes:
        return
    name = clashes[0]
    makers = [unit for unit in units if any(spec.name == name for spec in unit.outputs)]
    inputs = sorted({f"{info.name} ({info.file.name})" for unit in makers for info in unit.inputs if info.offset >= 0})
    raise BadInputError(
        f"output tensor {name} would be written twice (from {', '.join(inputs) or 'two layers'}): the input "
        f"holds a stray tensor under a name quantization writes; remove it, or leave {module_of(name)} "
        f"unquantized with --ignore {module_of(name)}"
    )


def _check_space(target: Path, needed: int, others: str = "") -> None:
    place = Path(os.path.abspath(target))  # itself when it exists: an output filled in place (a mount point)
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        free = shutil.disk_usage(place).free
    except OSError:
        return
    margin = 1 << 20  # config, index and file-system overhead
    if needed + margin > free:
        raise BadInputError(
            f"{target}: the output needs {_human(needed)}{others} but {place} has only {_human(free)} free"
        )


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def job_options(request: object) -> dict:
    """The options that decide the output's bytes (not how the run is shown or where it goes)."""
    skip = {"show_progress", "overwrite", "dry_run", "resume", "output", "device", "workers"}  # same bytes anywhere
    return {f.name: repr(getattr(request, f.name)) for f in dataclasses.fields(request)  # type: ignore[arg-type]
            if f.name not in skip}


def job_fingerprint(checkpoint: Checkpoint, shards: dict[str, list[TensorSpec]], quant_config: dict | None,
                    options: dict | None) -> str:
    """What a resumed run must share with the dead one: the input files (name, size, mtime), the config,
    the options, the output's layout and the qconvert version."""
    files = []
    for path in [*checkpoint.weight_files, checkpoint.root / CONFIG_NAME]:
        try:
            st = path.stat()
            files.append([path.name, st.st_size, st.st_mtime_ns])
        except OSError:
            files.append([path.name, None, None])
    layout = {name: [[s.name, str(s.dtype), list(s.shape)] for s in specs] for name, specs in shards.items()}
    blob = json.dumps({"version": __version__, "files": files, "config": checkpoint.config,
                       "quantization_config": quant_config, "options": options, "layout": layout},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def finish_shard(out: OutputFolder, shard: ShardFile) -> None:
    """A shard's bytes are on disk: read its header back with the reference reader, then journal it with
    its digest (hashed while it was written: no second pass over the shard)."""
    check_shard(shard.path, set(shard.specs))
    out.record(shard.path.name, shard.digest())


def reuse_finished(out: OutputFolder, names: list[str], layout: list[list[TensorSpec]], units: list[Unit],
                   bar: Progress, notice: Notice) -> tuple[set[str], list[Unit]]:
    """The shards an earlier run of this job finished (still intact), and the units left to run."""
    reused = {name for name, specs in zip(names, layout, strict=True) if out.reusable(name, shard_regions(specs))}
    if not reused:
        return reused, units
    notice(f"note: --resume: reusing {len(reused)} of {len(names)} shards finished by the earlier run")
    done = {spec.name for name, specs in zip(names, layout, strict=True) if name in reused for spec in specs}
    todo = []
    for unit in units:
        if unit.outputs and all(spec.name in done for spec in unit.outputs):
            bar.advance(unit.input_bytes)
        else:
            todo.append(unit)
    return reused, todo
