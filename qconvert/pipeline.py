"""Running a job: read → plan → (quantize | convert) → format → write, one unit at a time.

Peak memory is one unit's inputs plus its outputs (and the previous unit's outputs while they are
written): tensors that pass through are copied file to file, and each output shard's layout is fixed
before any data is written, so tensors land at their final offsets as soon as they are produced.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from qconvert import __version__
from qconvert.architectures import facts_from_config
from qconvert.checkpoint import Checkpoint, open_checkpoint, require_utf8_name, resolve_source
from qconvert.conversions import OPS, ConvertOp, plan_conversion
from qconvert.engine import (
    ExecutionSettings,
    execute,
    execution_settings,
    report_stage,
    resolve_device,
    warm_up,
)
from qconvert.errors import BadInputError
from qconvert.format import LAYOUTS, quantization_config
from qconvert.formats import Algorithm, Layout, NumberType
from qconvert.model_card import CARD_NAME, write_model_card
from qconvert.numerics import require_finite_part
from qconvert.planning import Plan, check_coverage, compile_patterns, make_plan, module_of
from qconvert.preflight import (
    check_output_plan,
    check_plan,
    finish_shard,
    job_fingerprint,
    job_options,
    preflight_output,
    reuse_finished,
)
from qconvert.progress import Progress
from qconvert.safetensors_io import ShardFile, TensorInfo, TensorReader
from qconvert.schemes import Scheme
from qconvert.serving import (
    SGLANG_VERSION,
    TRANSFORMERS_VERSION,
    VLLM_VERSION,
    family_of,
    misaligned_layer,
    output_kind,
    servers_missing,
    serves_in,
)
from qconvert.sources import StoredLayer, logical_view, rebuild_weight, stored_experts, stored_layers
from qconvert.units import ExactCasts, Unit, apply_fnuz, exact_casts, quantize_units, shared_tensor_scales
from qconvert.writing import (
    INDEX_NAME,
    OutputFolder,
    check_output_location,
    layout_shards,
    run_guard,
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
    fused_patterns: list[str] | None = None  # None: the architecture's fusion map
    layout: Layout = Layout.COMPRESSED_TENSORS
    max_shard_bytes: int = 5 * 10**9
    overwrite: bool = False
    revision: str | None = None
    dry_run: bool = False
    allow_requantize: bool = False
    fnuz: bool = False
    force_layout: bool = False
    show_progress: bool = True
    resume: bool = False
    include_vision: bool = False
    keep_fused_experts: bool = False
    min_coverage: float | None = None
    device: str = "auto"  # auto | cpu | cuda[:N]: where units compute
    workers: int | None = None  # I/O threads (None: qconvert.engine.default_workers())


def default_output(model: str, source: Path, suffix: str) -> Path:
    """Beside the input where a user would look for it, else ``./NAME-SUFFIX`` (see :mod:`qconvert.naming`)."""
    from qconvert.naming import default_output as choose

    return choose(model, source, suffix)


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
    settings: ExecutionSettings | None = None  # where and with how many workers to execute
    needed_bytes: int = 0  # what the output takes on disk (batch checks the free space for all outputs at once)


def quantize(request: QuantizeRequest, notice: Notice) -> dict:
    with run_guard():  # releases the output's lock however the run ends
        return _quantize(request, notice)


def _quantize(request: QuantizeRequest, notice: Notice) -> dict:
    report_stage("quantize starts")
    prepared = prepare_quantize(request, notice)
    report_stage("planned")
    checkpoint, target, units, plan = prepared.checkpoint, prepared.target, prepared.units, prepared.plan
    if request.dry_run:
        return summarize(checkpoint, units, target, [], time.perf_counter() - prepared.started, plan=plan,
                         dry_run=True, **prepared.summary_extra)
    shards = write_checkpoint(checkpoint, units, target, prepared.config, request.max_shard_bytes,
                              request.show_progress, notice, resume=request.resume, options=job_options(request),
                              settings=prepared.settings)
    report_stage("committed")
    return summarize(checkpoint, units, target, shards, time.perf_counter() - prepared.started, plan=plan,
                     **prepared.summary_extra)


def check_request(request: QuantizeRequest, *, check_device: bool = True,
                  blame: Callable[[str, BadInputError], Exception] | None = None) -> None:
    """Every value of a request that can be checked without reading the model (``batch`` checks all its jobs
    with it before any work). ``blame(param, error)``: see :func:`qconvert.options.quantize_request`;
    ``check_device=False`` checks the device's spelling, not that this machine has it."""

    def step(param: str, check: Callable[[], object]) -> None:
        try:
            check()
        except BadInputError as exc:
            if blame is None:
                raise
            raise blame(param, exc) from None

    def layout() -> None:
        if request.layout not in LAYOUTS:
            raise BadInputError(f"--layout {request.layout!r}: choose from {', '.join(LAYOUTS)}")

    def device() -> None:
        name = str(request.device or "auto").strip().lower()
        if check_device or not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
            resolve_device(request.device)

    def coverage() -> None:
        minimum = request.min_coverage
        if minimum is not None and not 0 <= minimum <= 1:
            raise BadInputError(f"--min-coverage {minimum}: must be a fraction between 0 and 1")

    step("layout", layout)
    step("workers", lambda: execution_settings("cpu", request.workers))
    step("device", device)
    step("min_coverage", coverage)
    step("ignore", lambda: compile_patterns(request.ignore, "--ignore"))
    step("targets", lambda: compile_patterns(request.targets, "--targets"))
    step("override", lambda: compile_patterns([pattern for pattern, _ in request.overrides], "--override"))


def prepare_quantize(request: QuantizeRequest, notice: Notice) -> PreparedQuantize:
    """Everything of a quantize run before its first write: source, output check, plan, config, units, and
    every check of the output that needs no write (stray names, files to copy, free space)."""
    started = time.perf_counter()
    check_request(request)
    request = replace(request, layout=Layout(request.layout))
    source = resolve_source(request.model, request.revision)
    target = (request.output or default_output(request.model, source, request.scheme.name)).expanduser()
    require_utf8_name(target, "the output folder")
    settings = execution_settings(request.device, request.workers)
    # A dry run makes every check the run would make before writing (without the lock file), so that it
    # fails, with the same exit code, where the run would.
    check_output_location(source, target, request.overwrite, lock=not request.dry_run)
    if not request.dry_run:
        warm_up(settings)
    checkpoint = open_checkpoint(source)
    with TensorReader() as reader:
        stored = stored_layers(checkpoint, reader)
        experts = stored_experts(checkpoint, reader)
        view = logical_view(checkpoint, stored, experts)
        plan = make_plan(replace(checkpoint, tensors=view), request.scheme, request.ignore, request.targets,
                         request.overrides, request.include_vision, request.keep_fused_experts)
        refusal = None
        try:
            check_coverage(plan, request.min_coverage)
        except BadInputError as exc:
            if not request.dry_run:
                raise
            refusal = exc  # a dry run shows the plan the message points to, then fails as the run would

            def notice(_message: str) -> None:  # and its error stays the one line on stderr
                pass
        family = family_of(checkpoint.config, split_experts=bool(plan.splits))
        fused_patterns = plan.facts.fused_patterns if request.fused_patterns is None else request.fused_patterns
        check_plan(plan, view, stored)
        config = quantization_config(plan.schemes_by_module, plan.ignore, request.layout)
        if request.layout is Layout.SGLANG and family != "deepseek" and not request.force_layout:
            architecture = ", ".join(map(str, (checkpoint.config or {}).get("architectures") or [])) or "this model"
            raise BadInputError(
                f"--layout sglang: SGLang {SGLANG_VERSION}'s loader for {architecture} renames weight_scale_inv to "
                "weight_scale, so the block scales would never reach BlockInt8LinearMethod (it would serve "
                "garbage); only DeepSeek-family loaders keep them. Use the compressed-tensors layout, or "
                "--force-layout")
        if request.fnuz:
            config["qconvert_fp8_format"] = "e4m3fnuz"  # mark the output: the dtype alone is easy to miss
        fnuz = request.fnuz and any(s.args.number is NumberType.FP8_E4M3 for s in plan.schemes)
        kinds = sorted({output_kind(s.name, request.layout,
                                    "fnuz" if fnuz and s.args.number is NumberType.FP8_E4M3 else None)
                        for s in plan.schemes})
        # Units are built first without shared scales, so that a refusal (--allow-requantize) comes
        # before the pre-pass reads every fused tensor; building them again later costs no I/O.
        casts = exact_casts(plan, stored, reader, fused_patterns, request.allow_requantize) \
            if request.layout is Layout.COMPRESSED_TENSORS else ExactCasts()
        units, notes = quantize_units(view, plan, request.layout, stored, {}, request.allow_requantize, casts)
        _report_skips(plan, notice)
        if stored or experts:
            described = ", ".join(filter(None, [describe_stored(stored),
                                                f"{len(experts)} expert tensors gpt-oss MXFP4" if experts else ""]))
            notes.insert(0, f"note: the input is quantized ({described}); matching layers are "
                         "copied, others rebuilt and requantized, unquantized ones written back in full precision")
        misaligned = _block_misaligned(plan, view, request.layout)
        if misaligned is not None:
            notes.append(f"note: {misaligned[0]} {list(misaligned[1])} is not whole 128x128 blocks: vLLM and SGLang "
                         "refuse block-scaled layers with a partial block (qconvert verify and transformers load "
                         "it); for those engines give such layers (and the rest of their fused layer) fp8, e.g. "
                         "--override 're:.*self_attn.*=fp8'")
        notes.extend(_serving_notes(kinds, family, request.fnuz, misaligned is not None))
        if casts.note():
            notes.append(casts.note())
        for note in notes:
            notice(note)
        if not request.dry_run:
            shared = shared_tensor_scales(plan, partial(weight_amax, view, stored, reader), fused_patterns,
                                          lambda names: all(n in casts.shared for n in names)
                                          or _already_shared(plan, stored, reader, names))
            units, _ = quantize_units(view, plan, request.layout, stored, shared, request.allow_requantize, casts)
    if request.fnuz:
        units = apply_fnuz(units)
    serving = [s.to_json() for s in serves_in(kinds, family, misaligned is not None)]
    if refusal is not None:  # a dry run refused by --min-coverage: its plan first (the CLI prints it), then the line
        refusal.plan_summary = summarize(  # type: ignore[attr-defined]
            checkpoint, units, target, [], time.perf_counter() - started, plan=plan, dry_run=True,
            serves_in=serving)
        raise refusal
    # What write_checkpoint checks again before its first write, here too, so that a dry run fails where the run
    # would, and each output of a batch is refused (a stray weight_scale, a file that would collide, no room)
    # before any job writes.
    layout = layout_shards([unit.outputs for unit in units], request.max_shard_bytes)
    needed = check_output_plan(checkpoint, units, target, layout, checkpoint.other_files)
    if any(s.args.algorithm is Algorithm.SEARCH for s in plan.quantize.values()):
        settings = replace(settings, free_pages=True)  # compute outweighs refaulting pages (malloc_policy.FreePages)
    return PreparedQuantize(checkpoint, target, plan, config, units, started, {"serves_in": serving}, settings,
                            needed)


def _block_misaligned(plan: Plan, view: dict[str, TensorInfo], layout: str) -> tuple[str, tuple[int, ...]] | None:
    """The first layer of a block scheme that is not whole blocks (engines refuse it), or None."""
    for name, scheme in plan.quantize.items():
        hit = misaligned_layer(output_kind(scheme.name, layout), [(module_of(name), view[name].shape)])
        if hit is not None:
            return hit
    for split in plan.splits.values():  # 3-D experts written per expert: each part's [out, in]
        hit = misaligned_layer(output_kind(split.scheme.name, layout),
                               [(module, shape) for module, _, _, shape in split.layers])
        if hit is not None:
            return hit
    return None


def _serving_notes(kinds: list[str], family: str, fnuz: bool, misaligned: bool = False) -> list[str]:
    """What the user should know about where the output can be served (from the serving table)."""
    notes = []
    if fnuz:
        notes.append(f"note: --fnuz writes e4m3fnuz values for runtimes that read fp8 weights as stored (qconvert "
                     f"verify); vLLM {VLLM_VERSION} and SGLang {SGLANG_VERSION} load plain e4m3fn checkpoints and "
                     "normalize them to fnuz on ROCm themselves, so for them leave out --fnuz")
    elif servers_missing(kinds, family, misaligned):
        where = "; ".join(s.describe() for s in serves_in(kinds, family, misaligned)) or "nothing we have tested"
        hint = (" (for SGLang, --layout sglang on DeepSeek-family models)"
                if "int8-block" in kinds else "")
        notes.append(f"note: neither vLLM {VLLM_VERSION} nor SGLang {SGLANG_VERSION} loads {', '.join(kinds)} in "
                     f"this layout for this architecture; it loads in: {where}{hint}")
    return notes


@dataclass
class ConvertRequest:
    model: str
    op: ConvertOp | str  # a ConvertOp; the command line's string is checked and converted by convert()
    output: Path | None = None
    fused_patterns: list[str] | None = None  # None: the architecture's fusion map
    dtype: torch.dtype | None = None
    max_shard_bytes: int = 5 * 10**9
    overwrite: bool = False
    revision: str | None = None
    show_progress: bool = True
    resume: bool = False
    device: str = "auto"
    workers: int | None = None


def convert(request: ConvertRequest, notice: Notice) -> dict:
    with run_guard():
        return _convert(request, notice)


def _convert(request: ConvertRequest, notice: Notice) -> dict:
    started = time.perf_counter()
    if request.op not in OPS:
        raise BadInputError(f"--op {request.op!r}: choose from {', '.join(OPS)}")
    request = replace(request, op=ConvertOp(request.op))
    source = resolve_source(request.model, request.revision)
    target = (request.output or default_output(request.model, source, request.op.value)).expanduser()
    require_utf8_name(target, "the output folder")
    check_output_location(source, target, request.overwrite)
    settings = execution_settings(request.device, request.workers)
    warm_up(settings)
    checkpoint = open_checkpoint(source)
    with TensorReader() as reader:
        layers = stored_layers(checkpoint, reader)
        experts = stored_experts(checkpoint, reader)
        fused_patterns = request.fused_patterns
        if fused_patterns is None:
            fused_patterns = facts_from_config(checkpoint.config).fused_patterns
        plan = plan_conversion(request.op, checkpoint.tensors, layers, checkpoint.config or {}, reader,
                               fused_patterns, request.dtype, experts)
    for note in plan.notes:
        notice(note)
    if plan.unchanged:  # the output would equal the input: write nothing (exit 0; the CLI says so)
        return summarize(checkpoint, [], None, [], time.perf_counter() - started, op=request.op.value,
                         converted=[], unchanged=plan.unchanged)
    shards = write_checkpoint(checkpoint, plan.units, target, plan.config, request.max_shard_bytes,
                              request.show_progress, notice, resume=request.resume, options=job_options(request),
                              settings=settings)
    return summarize(checkpoint, plan.units, target, shards, time.perf_counter() - started, op=request.op.value,
                     converted=plan.converted)


def load_weight(view: dict[str, TensorInfo], stored: dict[str, StoredLayer], reader: TensorReader,
                name: str) -> torch.Tensor:
    """A weight as the planner sees it: read as stored, or rebuilt from its quantized form."""
    layer = stored.get(name.removesuffix(".weight"))
    if layer is None:
        return reader.read(view[name])
    return rebuild_weight(layer, {leaf: reader.read(info) for leaf, info in layer.parts.items()})


AMAX_CHUNK_BYTES = 8 << 20


def weight_amax(view: dict[str, TensorInfo], stored: dict[str, StoredLayer], reader: TensorReader,
                name: str) -> tuple[torch.Tensor, torch.dtype]:
    """``(|x| max as float32, dtype)`` of a weight as the planner sees it. A stored weight is read in chunks of
    8 MiB into one buffer (max is exact in any order), so the fused-scale pre-pass holds no whole tensor; a
    quantized input is rebuilt. A NaN or Inf is blamed on the tensor that holds it."""
    info = view[name]
    if name.removesuffix(".weight") in stored:
        weight = load_weight(view, stored, reader, name)
        low, high = torch.aminmax(weight)
    else:
        step = max(1, AMAX_CHUNK_BYTES // info.dtype.itemsize) * info.dtype.itemsize
        buffer = torch.empty(min(step, info.nbytes), dtype=torch.uint8)
        low = high = torch.zeros((), dtype=info.dtype)
        for start in range(0, info.nbytes, step):
            length = min(step, info.nbytes - start)
            reader.read_into(info, memoryview(buffer.numpy())[:length], start, length)
            chunk_low, chunk_high = torch.aminmax(buffer[:length].view(info.dtype))  # no copy of |x|
            low, high = torch.minimum(low, chunk_low), torch.maximum(high, chunk_high)
    amax = torch.maximum(-low, high).to(torch.float32)
    if not torch.isfinite(amax):
        require_finite_part(name, load_weight(view, stored, reader, name))  # else another part would be blamed
    return amax, info.dtype


def _already_shared(plan: Plan, stored: dict[str, StoredLayer], reader: TensorReader, names: list[str]) -> bool:
    """Whether every part of a fused group is a stored layer that its scheme would copy and that holds the same
    shared value as the others (an NVFP4 input's global scale, an fp8-tensor input's scale): then it is copied."""
    values = []
    for name in names:
        layer, scheme = stored.get(module_of(name)), plan.quantize[name]
        if layer is None or not layer.matches(scheme.format, scheme.args):
            return False
        values.append(layer.format.stored_shared(layer, reader))
    return all(v is not None and torch.equal(v, values[0]) for v in values)


def describe_stored(stored: dict[str, StoredLayer]) -> str:
    kinds: dict[str, int] = {}
    for layer in stored.values():
        key = f"{layer.layout} {layer.label}"
        kinds[key] = kinds.get(key, 0) + 1
    return ", ".join(f"{count} layers {key}" for key, count in sorted(kinds.items()))


def write_checkpoint(checkpoint: Checkpoint, units: list[Unit], target: Path, quant_config: dict | None,
                     max_shard_bytes: int, show_progress: bool, notice: Notice, *, resume: bool = False,
                     options: dict | None = None, settings: ExecutionSettings | None = None,
                     finish: Callable[[Path], None] | None = None) -> list[str]:
    """Execute ``units`` into a new checkpoint folder at ``target``, atomically. ``finish`` is called on the
    complete temporary folder before it is renamed into place (batch records its fingerprint there).

    With ``resume``, the finished shards of a dead run of the same job (same input, options and layout)
    are kept, checked against their journaled sha256, and only the other shards are computed again."""
    for path in checkpoint.unindexed_weight_files:
        notice(f"note: {path.name} is not in the index; it is not part of the model and is not copied")
    layout = layout_shards([unit.outputs for unit in units], max_shard_bytes)
    names = shard_names(len(layout))
    other_files = checkpoint.other_files
    preflight_output(checkpoint, units, target, layout, other_files, notice)
    fingerprint = job_fingerprint(checkpoint, dict(zip(names, layout, strict=True)), quant_config, options)
    copy_bytes = sum((checkpoint.root / rel).stat().st_size for rel in other_files)
    total = sum(unit.input_bytes for unit in units) + copy_bytes

    planned = [*names, "config.json", CARD_NAME, *([INDEX_NAME] if len(layout) > 1 else []),
               *(rel.as_posix() for rel in other_files)]  # every file it writes: --resume removes any other
    with OutputFolder(target, fingerprint, resume, notice, planned) as out, \
            Progress(total, len(units), show_progress) as bar:
        reused, units = reuse_finished(out, names, layout, units, bar, notice)
        shard_of: dict[str, ShardFile] = {}
        shards = []
        try:
            for name, specs in zip(names, layout, strict=False):
                if name in reused:
                    continue
                shard = ShardFile(out.path / name, specs, digest=True)
                shard.on_close = partial(finish_shard, out)
                shards.append(shard)
                shard_of.update({spec.name: shard for spec in specs})
            _execute(units, shard_of, bar, settings)
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
        for rel in other_files:  # journaled one by one: --resume keeps a copy only once it is proven whole
            if not out.reusable_copy(rel.as_posix(), checkpoint.root / rel):
                out.copy(rel.as_posix(), checkpoint.root / rel)  # follows hub-cache symlinks to the blobs
            bar.advance((checkpoint.root / rel).stat().st_size, tensors=0)
        write_model_card(out.path, checkpoint.root, config, other_files)
        if finish is not None:  # (batch's fingerprint: written last, after every other file)
            finish(out.path)
        out.commit()
    return names


def _execute(units: list[Unit], shard_of: dict[str, ShardFile], bar: Progress,
             settings: ExecutionSettings | None = None) -> None:
    """Run every unit into its shard and fsync the shards (qconvert.engine: parallel I/O, CPU or GPU)."""
    execute(units, shard_of, bar, settings or execution_settings("auto"))


def _report_skips(plan: Plan, notice: Notice) -> None:
    """One note per reason a linear weight is left unquantized (the output head aside)."""
    by_reason: dict[str, list] = {}
    for skipped in plan.skipped:
        if (skipped.runtime_linear or skipped.kind is not None) and skipped.module.rpartition(".")[2] != "lm_head":
            by_reason.setdefault(skipped.reason, []).append(skipped)
    for reason, layers in list(by_reason.items())[:8]:
        first = layers[0]
        more = f" and {len(layers) - 1} more" if len(layers) > 1 else ""
        notice(f"note: leaving {first.module} {list(first.shape)}{more} unquantized: {reason}")
    if len(by_reason) > 8:
        notice(f"note: ... and {len(by_reason) - 8} more reasons for layers left unquantized (see --json)")
    if plan.splits:
        first = next(iter(plan.splits.values()))
        spelled = "vLLM's own per-expert names" if first.split.vllm_spelling else "per-expert modules"
        notice(f"note: writing {len(plan.splits)} 3-D expert tensors (e.g. {first.tensor}) as one quantized layer "
               f"per expert ({first.modules[0]}, ...; {spelled}: {first.split.why}); transformers "
               f"{TRANSFORMERS_VERSION} loads no quantized layout of them: serve the output with vLLM")
    coverage = plan.coverage
    if coverage["share"] is not None and coverage["share"] < 1:
        notice(f"note: coverage {describe_coverage(coverage)}")


def describe_coverage(coverage: dict) -> str:
    """``87.5% of linear parameters quantized (attention 100%, experts 0%, ...)``."""
    kinds = ", ".join(f"{kind} {100 * v['share']:.1f}%" for kind, v in coverage["by_kind"].items()
                      if v["share"] is not None)
    return f"{100 * (coverage['share'] or 0):.1f}% of linear parameters quantized ({kinds})"


def summarize(checkpoint: Checkpoint, units: list[Unit], target: Path | None, shards: list[str],
              seconds: float, plan: Plan | None = None, dry_run: bool = False, **extra: object) -> dict:
    layers = [layer for unit in units for layer in unit.layers]
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
        summary["skipped"] = [{"module": s.module, "shape": list(s.shape), "reason": s.reason,
                               "kind": s.kind.value if s.kind else None} for s in plan.skipped]
        summary["coverage"] = plan.coverage
        summary["architecture"] = {"model_type": plan.facts.model_type,
                                   "architectures": list(plan.facts.architectures)}
    summary.update({k: (str(v) if isinstance(v, Path) else v) for k, v in extra.items()})
    return summary
