"""``qconvert quantize``: read → plan → quantize → format → write, one tensor at a time.

Peak memory is one input tensor plus its quantized outputs: tensors that pass through are copied
file to file, and each output shard's layout is fixed before any data is written, so tensors land
at their final offsets as soon as they are produced.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qconvert import __version__
from qconvert.checkpoint import Checkpoint, open_checkpoint, resolve_source
from qconvert.errors import BadInputError
from qconvert.format import compress_weight, output_specs, quantization_config
from qconvert.planning import Plan, make_plan, module_of
from qconvert.progress import Progress
from qconvert.safetensors_io import ShardFile, TensorInfo, TensorReader, TensorSpec
from qconvert.schemes import Scheme
from qconvert.writing import (
    OutputFolder,
    check_output_location,
    layout_shards,
    shard_names,
    write_index,
    write_json,
)

Notice = Callable[[str], None]


@dataclass
class QuantizeRequest:
    model: str
    scheme: Scheme
    output: Path | None = None
    ignore: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    max_shard_bytes: int = 5 * 10**9
    overwrite: bool = False
    revision: str | None = None
    show_progress: bool = True


def default_output(model: str, source: Path, scheme: Scheme) -> Path:
    if Path(model).expanduser().exists():
        return source.parent / f"{source.name}-{scheme.name}"
    return Path.cwd() / f"{model.rstrip('/').split('/')[-1]}-{scheme.name}"


def refuse_quantized_input(checkpoint: Checkpoint) -> None:
    existing = (checkpoint.config or {}).get("quantization_config")
    if existing:
        method = existing.get("quant_method", "unknown") if isinstance(existing, dict) else "unknown"
        raise BadInputError(
            f"{checkpoint.root / 'config.json'}: the input is already quantized "
            f"(quant_method {method!r}); quantize an unquantized checkpoint"
        )


def quantize(request: QuantizeRequest, notice: Notice) -> dict:
    started = time.perf_counter()
    source = resolve_source(request.model, request.revision)
    target = (request.output or default_output(request.model, source, request.scheme)).expanduser()
    check_output_location(source, target, request.overwrite)
    checkpoint = open_checkpoint(source)
    refuse_quantized_input(checkpoint)
    plan = make_plan(checkpoint, request.scheme, request.ignore, request.targets)
    _report_skips(plan, notice)
    for path in checkpoint.unindexed_weight_files:
        notice(f"note: {path.name} is not in the index; it is not part of the model and is not copied")

    units = [output_specs(info, plan.scheme_for(info)) for info in checkpoint.tensors.values()]
    layout = layout_shards(units, request.max_shard_bytes)
    names = shard_names(len(layout))
    other_files = checkpoint.other_files()
    copy_bytes = sum((source / rel).stat().st_size for rel in other_files)

    with (
        OutputFolder(target) as out,
        Progress(checkpoint.tensor_bytes + copy_bytes, len(checkpoint.tensors), request.show_progress) as bar,
    ):
        shard_of = {}
        shards = []
        for name, specs in zip(names, layout, strict=False):
            shard = ShardFile(out.path / name, specs)
            shards.append(shard)
            shard_of.update({spec.name: shard for spec in specs})
        try:
            _write_tensors(checkpoint, plan, shard_of, bar)
            for shard in shards:
                if shard.fd >= 0:
                    shard.close()  # raises if a planned tensor was never written
        finally:
            for shard in shards:
                shard.abort()  # no-op for shards already closed
        if len(layout) > 1:
            write_index(out.path, dict(zip(names, layout, strict=False)))
        config = dict(checkpoint.config or {})
        if checkpoint.config is None:
            notice(f"note: {source} has no config.json; writing one with only quantization_config")
        config["quantization_config"] = quantization_config(plan)
        write_json(out.path / "config.json", config)
        for rel in other_files:
            (out.path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, out.path / rel)  # follows hub-cache symlinks to the blobs
            bar.advance((source / rel).stat().st_size, tensors=0)
        out.commit()

    return _summary(request, checkpoint, plan, target, names, layout, other_files, time.perf_counter() - started)


class _WriteBehind:
    """Runs each write job on one worker thread while the caller quantizes the next tensor.

    At most one job is in flight, so memory stays bounded by two tensors' outputs; a job's error
    surfaces at the next submit or at exit. Jobs run in submission order, so a shard is closed only
    after all of its writes.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qconvert-write")
        self._pending: Future | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        self._pending = self._pool.submit(job)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> _WriteBehind:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        try:
            if exc_type is None:
                self.wait()
            elif self._pending is not None:
                # Already failing: let the write finish (its descriptors are about to be closed)
                # but keep the original error.
                wait([self._pending])
        finally:
            self._pool.shutdown(wait=True)


def _write_tensors(checkpoint: Checkpoint, plan: Plan, shard_of: dict[str, ShardFile], bar: Progress) -> None:
    def finish(shards: set[ShardFile]) -> None:
        for shard in shards:
            if not shard.pending and shard.fd >= 0:
                shard.close()

    def copy_job(info: TensorInfo) -> Callable[[], None]:
        def job() -> None:
            shard = shard_of[info.name]
            reader.copy_into(info, shard.fd, shard.position(info.name))
            shard.mark_written(info.name)
            finish({shard})
        return job

    def write_job(outputs: dict[str, torch.Tensor]) -> Callable[[], None]:
        def job() -> None:
            for name, tensor in outputs.items():
                shard_of[name].write(name, tensor)
            finish({shard_of[name] for name in outputs})
        return job

    with TensorReader() as reader, _WriteBehind() as writer:
        for info in checkpoint.tensors.values():
            scheme = plan.scheme_for(info)
            if scheme is None:
                writer.submit(copy_job(info))
            else:
                weight = reader.read(info)
                outputs = compress_weight(info.name, weight, scheme)
                _require_finite(info, weight, outputs)
                del weight
                writer.submit(write_job(outputs))
            bar.advance(info.nbytes)


def _require_finite(info: TensorInfo, weight: torch.Tensor, outputs: dict[str, torch.Tensor]) -> None:
    # A NaN or Inf anywhere in a group makes that group's amax, hence its scale, non-finite; so the
    # scales are the cheap place to look, and the weight is only scanned to write the message.
    scales = next(t for name, t in outputs.items() if name.endswith(".weight_scale"))
    if torch.isfinite(scales).all():
        return
    nan = int(torch.isnan(weight).sum())
    inf = int(torch.isinf(weight).sum())
    raise BadInputError(
        f"{info.file.name}: tensor {info.name} holds {nan} NaN and {inf} Inf values; refusing to "
        f"quantize it (repair the checkpoint, or skip the layer with --ignore {module_of(info.name)})"
    )


def _report_skips(plan: Plan, notice: Notice) -> None:
    notable = [s for s in plan.skipped if s.runtime_linear and s.module != "lm_head"]
    for skipped in notable[:8]:
        notice(f"note: leaving {skipped.module} {list(skipped.shape)} unquantized: {skipped.reason}")
    if len(notable) > 8:
        notice(f"note: ... and {len(notable) - 8} more layers left unquantized (see --json)")


def _summary(
    request: QuantizeRequest,
    checkpoint: Checkpoint,
    plan: Plan,
    target: Path,
    names: list[str],
    layout: list[list[TensorSpec]],
    other_files: list[Path],
    seconds: float,
) -> dict:
    layers = []
    for info in checkpoint.tensors.values():
        scheme = plan.scheme_for(info)
        if scheme is None:
            continue
        after = sum(spec.nbytes for spec in output_specs(info, scheme))
        layers.append({
            "module": module_of(info.name), "scheme": scheme.name, "label": scheme.label,
            "shape": list(info.shape), "dtype": str(info.dtype).removeprefix("torch."),
            "bytes_before": info.nbytes, "bytes_after": after,
        })
    quantized_params = sum(layer["shape"][0] * layer["shape"][1] for layer in layers)
    quantized_bytes = sum(layer["bytes_after"] for layer in layers)
    bytes_after = sum(spec.nbytes for specs in layout for spec in specs)
    total_params = sum(info.numel for info in checkpoint.tensors.values())
    return {
        "qconvert_version": __version__,
        "input": str(checkpoint.root),
        "output": str(target),
        "scheme": request.scheme.name,
        "group_size": request.scheme.group_size,
        "format": request.scheme.format,
        "shards": names,
        "files_copied": [str(rel) for rel in other_files],
        "tensors": len(checkpoint.tensors),
        "quantized_layers": len(layers),
        "bytes_before": checkpoint.tensor_bytes,
        "bytes_after": bytes_after,
        "compression_ratio": round(checkpoint.tensor_bytes / bytes_after, 4) if bytes_after else None,
        "bits_per_weight": round(8 * quantized_bytes / quantized_params, 4),
        "bits_per_param_overall": round(8 * bytes_after / total_params, 4) if total_params else None,
        "ignore": plan.ignore,
        "seconds": round(seconds, 3),
        "layers": layers,
        "skipped": [
            {"module": s.module, "shape": list(s.shape), "reason": s.reason} for s in plan.skipped
        ],
    }
