"""Running a job: read → plan → (quantize | convert) → format → write, one unit at a time.

Peak memory is one unit's inputs plus its outputs (and the previous unit's outputs while they are
written): tensors that pass through are copied file to file, and each output shard's layout is fixed
before any data is written, so tensors land at their final offsets as soon as they are produced.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from qconvert import __version__
from qconvert.checkpoint import Checkpoint, open_checkpoint, resolve_source
from qconvert.conversions import plan_conversion
from qconvert.errors import BadInputError
from qconvert.format import LAYOUTS, quantization_config
from qconvert.planning import Plan, make_plan
from qconvert.progress import Progress
from qconvert.safetensors_io import ShardFile, TensorInfo, TensorReader
from qconvert.schemes import Scheme
from qconvert.serving import SGLANG_VERSION, VLLM_VERSION, family_of, output_kind, servers_missing, serves_in
from qconvert.sources import StoredLayer, logical_view, rebuild_weight, stored_layers
from qconvert.units import DEFAULT_FUSED_PATTERNS, Unit, apply_fnuz, quantize_units, shared_tensor_scales
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
    overrides: list[tuple[str, Scheme | None]] = field(default_factory=list)
    fused_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_FUSED_PATTERNS))
    layout: str = "compressed-tensors"
    max_shard_bytes: int = 5 * 10**9
    overwrite: bool = False
    revision: str | None = None
    dry_run: bool = False
    allow_requantize: bool = False
    fnuz: bool = False
    force_layout: bool = False
    show_progress: bool = True


def default_output(model: str, source: Path, suffix: str) -> Path:
    if Path(model).expanduser().exists():
        return source.parent / f"{source.name}-{suffix}"
    return Path.cwd() / f"{model.rstrip('/').split('/')[-1]}-{suffix}"


@dataclass
class PreparedQuantize:
    """A quantize run planned and ready to write (what :func:`quantize` writes; ``batch`` fans several out)."""

    checkpoint: Checkpoint
    target: Path
    plan: Plan
    config: dict
    units: list[Unit]
    started: float
    summary_extra: dict = field(default_factory=dict)  # what the summary adds (serves_in)


def quantize(request: QuantizeRequest, notice: Notice) -> dict:
    prepared = prepare_quantize(request, notice)
    checkpoint, target, units, plan = prepared.checkpoint, prepared.target, prepared.units, prepared.plan
    if request.dry_run:
        return summarize(checkpoint, units, target, [], time.perf_counter() - prepared.started, plan=plan,
                         dry_run=True, **prepared.summary_extra)
    shards = write_checkpoint(checkpoint, units, target, prepared.config, request.max_shard_bytes,
                              request.show_progress, notice)
    return summarize(checkpoint, units, target, shards, time.perf_counter() - prepared.started, plan=plan,
                     **prepared.summary_extra)


def prepare_quantize(request: QuantizeRequest, notice: Notice) -> PreparedQuantize:
    """Everything of a quantize run before its first write: source, output check, plan, config, units."""
    started = time.perf_counter()
    if request.layout not in LAYOUTS:
        raise BadInputError(f"--layout {request.layout!r}: choose from {', '.join(LAYOUTS)}")
    source = resolve_source(request.model, request.revision)
    target = (request.output or default_output(request.model, source, request.scheme.name)).expanduser()
    if not request.dry_run:
        check_output_location(source, target, request.overwrite)
    checkpoint = open_checkpoint(source)
    family = family_of(checkpoint.config)
    with TensorReader() as reader:
        stored = stored_layers(checkpoint, reader)
        view = logical_view(checkpoint, stored)
        plan = make_plan(replace(checkpoint, tensors=view), request.scheme, request.ignore, request.targets,
                         request.overrides)
        config = quantization_config(plan.schemes_by_module, plan.ignore, request.layout)
        if request.layout == "sglang" and family != "deepseek" and not request.force_layout:
            architecture = ", ".join(map(str, (checkpoint.config or {}).get("architectures") or [])) or "this model"
            raise BadInputError(
                f"--layout sglang: SGLang {SGLANG_VERSION}'s loader for {architecture} renames weight_scale_inv to "
                "weight_scale, so the block scales would never reach BlockInt8LinearMethod (it would serve "
                "garbage); only DeepSeek-family loaders keep them. Use the compressed-tensors layout, or "
                "--force-layout")
        if request.fnuz:
            config["qconvert_fp8_format"] = "e4m3fnuz"  # mark the output: the dtype alone is easy to miss
        kinds = sorted({output_kind(s.name, request.layout, "fnuz" if request.fnuz and s.kind == "float" else None)
                        for s in plan.quantize.values()})
        # Units are built first without shared scales, so that a refusal (--allow-requantize) comes
        # before the pre-pass reads every fused tensor; building them again later costs no I/O.
        units, notes = quantize_units(view, plan, request.layout, stored, {}, request.allow_requantize)
        _report_skips(plan, notice)
        if stored:
            notes.insert(0, f"note: the input is quantized ({describe_stored(stored)}); matching layers are "
                         "copied, others rebuilt and requantized, unquantized ones written back in full precision")
        notes.extend(_serving_notes(kinds, family, request.fnuz))
        for note in notes:
            notice(note)
        if not request.dry_run:
            shared = shared_tensor_scales(plan, partial(load_weight, view, stored, reader), request.fused_patterns)
            units, _ = quantize_units(view, plan, request.layout, stored, shared, request.allow_requantize)
    if request.fnuz:
        units = apply_fnuz(units)
    serving = [s.to_json() for s in serves_in(kinds, family)]
    return PreparedQuantize(checkpoint, target, plan, config, units, started, {"serves_in": serving})


def _serving_notes(kinds: list[str], family: str, fnuz: bool) -> list[str]:
    """What the user should know about where the output can be served (from the serving table)."""
    notes = []
    if fnuz:
        notes.append(f"note: --fnuz writes e4m3fnuz values for runtimes that read fp8 weights as stored (qconvert "
                     f"verify); vLLM {VLLM_VERSION} and SGLang {SGLANG_VERSION} load plain e4m3fn checkpoints and "
                     "normalize them to fnuz on ROCm themselves, so for them leave out --fnuz")
    elif servers_missing(kinds, family):
        where = "; ".join(s.describe() for s in serves_in(kinds, family)) or "nothing we have tested"
        hint = (" (for SGLang, --layout sglang on DeepSeek-family models)"
                if "int8-block" in kinds else "")
        notes.append(f"note: neither vLLM {VLLM_VERSION} nor SGLang {SGLANG_VERSION} loads {', '.join(kinds)} in "
                     f"this layout for this architecture; it loads in: {where}{hint}")
    return notes


@dataclass
class ConvertRequest:
    model: str
    op: str
    output: Path | None = None
    fused_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_FUSED_PATTERNS))
    dtype: torch.dtype | None = None
    max_shard_bytes: int = 5 * 10**9
    overwrite: bool = False
    revision: str | None = None
    show_progress: bool = True


def convert(request: ConvertRequest, notice: Notice) -> dict:
    started = time.perf_counter()
    source = resolve_source(request.model, request.revision)
    target = (request.output or default_output(request.model, source, request.op)).expanduser()
    check_output_location(source, target, request.overwrite)
    checkpoint = open_checkpoint(source)
    with TensorReader() as reader:
        layers = stored_layers(checkpoint, reader)
        plan = plan_conversion(request.op, checkpoint.tensors, layers, checkpoint.config or {}, reader,
                               request.fused_patterns, request.dtype)
    for note in plan.notes:
        notice(note)
    shards = write_checkpoint(checkpoint, plan.units, target, plan.config, request.max_shard_bytes,
                              request.show_progress, notice)
    return summarize(checkpoint, plan.units, target, shards, time.perf_counter() - started, op=request.op,
                     converted=plan.converted)


def load_weight(view: dict[str, TensorInfo], stored: dict[str, StoredLayer], reader: TensorReader,
                name: str) -> torch.Tensor:
    """A weight as the planner sees it: read as stored, or rebuilt from its quantized form."""
    layer = stored.get(name.removesuffix(".weight"))
    if layer is None:
        return reader.read(view[name])
    return rebuild_weight(layer, {leaf: reader.read(info) for leaf, info in layer.parts.items()})


def describe_stored(stored: dict[str, StoredLayer]) -> str:
    kinds: dict[str, int] = {}
    for layer in stored.values():
        key = f"{layer.layout} {layer.label}"
        kinds[key] = kinds.get(key, 0) + 1
    return ", ".join(f"{count} layers {key}" for key, count in sorted(kinds.items()))


def write_checkpoint(checkpoint: Checkpoint, units: list[Unit], target: Path, quant_config: dict | None,
                     max_shard_bytes: int, show_progress: bool, notice: Notice) -> list[str]:
    """Execute ``units`` into a new checkpoint folder at ``target``, atomically."""
    for path in checkpoint.unindexed_weight_files:
        notice(f"note: {path.name} is not in the index; it is not part of the model and is not copied")
    layout = layout_shards([unit.outputs for unit in units], max_shard_bytes)
    names = shard_names(len(layout))
    other_files = checkpoint.other_files
    copy_bytes = sum((checkpoint.root / rel).stat().st_size for rel in other_files)
    total = sum(unit.input_bytes for unit in units) + copy_bytes

    with OutputFolder(target) as out, Progress(total, len(units), show_progress) as bar:
        shard_of: dict[str, ShardFile] = {}
        shards = []
        try:
            for name, specs in zip(names, layout, strict=False):
                shard = ShardFile(out.path / name, specs)
                shards.append(shard)
                shard_of.update({spec.name: shard for spec in specs})
            _execute(units, shard_of, bar)
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
            notice(f"note: {checkpoint.root} has no config.json; writing one with only quantization_config")
        if quant_config is None:
            config.pop("quantization_config", None)
        else:
            config["quantization_config"] = quant_config
        write_json(out.path / "config.json", config)
        for rel in other_files:
            (out.path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(checkpoint.root / rel, out.path / rel)  # follows hub-cache symlinks to the blobs
            bar.advance((checkpoint.root / rel).stat().st_size, tensors=0)
        out.commit()
    return names


class _WriteBehind:
    """Runs each write job on one worker thread while the caller computes the next unit.

    At most one job is in flight, so memory stays bounded by two units' outputs; a job's error
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


def _execute(units: list[Unit], shard_of: dict[str, ShardFile], bar: Progress) -> None:
    def finish(shards: set[ShardFile]) -> None:
        for shard in shards:
            if not shard.pending and shard.fd >= 0:
                shard.close()

    def copy_job(unit: Unit) -> Callable[[], None]:
        def job() -> None:
            spec = unit.outputs[0]
            shard = shard_of[spec.name]
            reader.copy_into(unit.inputs[0], shard.fd, shard.position(spec.name))
            shard.mark_written(spec.name)
            finish({shard})
        return job

    def write_job(outputs: dict[str, torch.Tensor]) -> Callable[[], None]:
        def job() -> None:
            for name, tensor in outputs.items():
                shard_of[name].write(name, tensor)
            finish({shard_of[name] for name in outputs})
        return job

    with TensorReader() as reader, _WriteBehind() as writer:
        for unit in units:
            if unit.produce is None:
                writer.submit(copy_job(unit))
            else:
                tensors = [reader.read(info) for info in unit.inputs]
                outputs = unit.produce(tensors)
                del tensors
                writer.submit(write_job(outputs))
            bar.advance(unit.input_bytes)


def _report_skips(plan: Plan, notice: Notice) -> None:
    notable = [s for s in plan.skipped if s.runtime_linear and s.module != "lm_head"]
    for skipped in notable[:8]:
        notice(f"note: leaving {skipped.module} {list(skipped.shape)} unquantized: {skipped.reason}")
    if len(notable) > 8:
        notice(f"note: ... and {len(notable) - 8} more layers left unquantized (see --json)")


def summarize(checkpoint: Checkpoint, units: list[Unit], target: Path | None, shards: list[str],
              seconds: float, plan: Plan | None = None, dry_run: bool = False, **extra: object) -> dict:
    layers = [unit.layer for unit in units if unit.layer]
    quantized_params = sum(layer["shape"][0] * layer["shape"][1] for layer in layers)
    quantized_bytes = sum(layer["bytes_after"] for layer in layers)
    bytes_after = sum(spec.nbytes for unit in units for spec in unit.outputs)
    total_params = sum(info.numel for info in checkpoint.tensors.values())
    summary: dict = {
        "qconvert_version": __version__,
        "input": str(checkpoint.root),
        "output": str(target) if target else None,
        "dry_run": dry_run,
        "shards": shards,
        "files_copied": [str(rel) for rel in checkpoint.other_files],
        "tensors": len(checkpoint.tensors),
        "quantized_layers": len(layers),
        "schemes": sorted({layer["scheme"] for layer in layers}),
        "bytes_before": checkpoint.tensor_bytes,
        "bytes_after": bytes_after,
        "compression_ratio": round(checkpoint.tensor_bytes / bytes_after, 4) if bytes_after else None,
        "bits_per_weight": round(8 * quantized_bytes / quantized_params, 4) if quantized_params else None,
        "bits_per_param_overall": round(8 * bytes_after / total_params, 4) if total_params else None,
        "seconds": round(seconds, 3),
        "layers": layers,
    }
    if plan is not None:
        summary["scheme"] = plan.scheme.name
        summary["ignore"] = plan.ignore
        summary["skipped"] = [{"module": s.module, "shape": list(s.shape), "reason": s.reason} for s in plan.skipped]
    summary.update({k: (str(v) if isinstance(v, Path) else v) for k, v in extra.items()})
    return summary
