"""``qconvert batch``: many conversions from one job file, for unattended (CI) use.

The job file is validated entirely before any work; every option goes through the same parsing as
``qconvert quantize`` (the quantize command's own option declarations decide which keys exist, and the
CLI's helpers parse them). A job with several schemes reads its model once (:mod:`qconvert.fanout`);
an output whose fingerprint (:mod:`qconvert.fingerprint`) matches is skipped. Each output gives one
report row; :func:`run_job` is the same code whether it runs here or as a Ray task.
"""

from __future__ import annotations

import dataclasses
import string
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

from qconvert import __version__
from qconvert.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, BadInputError, QConvertError
from qconvert.fanout import Cancelled, Output, write_outputs
from qconvert.fingerprint import digest, input_files, is_up_to_date, read_fingerprint, write_fingerprint
from qconvert.pipeline import QuantizeRequest, prepare_quantize, summarize
from qconvert.writing import run_guard

TOP_KEYS = ("defaults", "jobs")
JOB_ONLY_KEYS = ("model",)
SCHEME_KEYS = ("scheme", "schemes")
# quantize options that are the batch command's own business (or meaningless in a job file)
BATCH_LEVEL = {"dry_run": "--dry-run", "quiet": "--quiet", "json": "--json", "debug": "--debug"}
TEMPLATE_FIELDS = ("name", "scheme")
# request fields that do not change an output's bytes, so not part of its fingerprint
NOT_FINGERPRINTED = {"model", "output", "overwrite", "show_progress", "dry_run", "resume"}
SUMMARY_KEYS = ("coverage", "serves_in")  # copied from the quantize summary into the report where present


class Status(str, Enum):
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass
class JobOutput:
    scheme: str
    target: Path
    request: QuantizeRequest
    options: dict  # the request as plain JSON: what the fingerprint records


@dataclass
class Job:
    index: int
    model: str
    outputs: list[JobOutput]

    @property
    def label(self) -> str:
        return f"jobs[{self.index}] ({self.model})"


@dataclass
class Settings:
    force: bool = False
    dry_run: bool = False
    fail_fast: bool = False


# ---------------------------------------------------------------------------------------------------
# The job file


@dataclass
class OptionSpec:
    """One ``quantize`` option as the CLI declares it: enough to check and convert a job file's value."""

    name: str  # the long name with underscores: max_shard_size
    flag: str  # the long flag itself: --max-shard-size
    param_name: str  # the parameter's name in the command function: overrides_file for --overrides
    multiple: bool
    is_flag: bool
    default: object
    command: object  # the quantize command, which parses the value exactly as on the command line


def option_specs(command: object) -> dict[str, OptionSpec]:
    """The options of the ``qconvert quantize`` click command (``cli.quantize_option_specs`` passes it), so that an
    option added there is a job-file key too (and an option removed there is refused here)."""
    specs = {}
    for param in command.params:  # type: ignore[attr-defined]
        # Typer may vendor its own click: recognise options by what they are, not by class.
        if getattr(param, "param_type_name", None) != "option":
            continue
        longs = [opt for opt in param.opts if opt.startswith("--")]
        if not longs:
            continue
        name = longs[0][2:].replace("-", "_")
        specs[name] = OptionSpec(name, longs[0], str(param.name), bool(param.multiple), bool(param.is_flag),
                                 param.default, command)
    return specs


def _convert(spec: OptionSpec, value: object) -> object:
    """A YAML value for an option, parsed by the quantize command as if typed after its flag; a ValueError
    says why not."""
    if spec.is_flag:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if not spec.multiple and isinstance(value, list):
        raise ValueError("expected a single value, got a list")
    items = value if isinstance(value, list) else [value]
    argv = ["MODEL"]
    for item in items:
        if isinstance(item, (dict, list, bool)) or item is None:
            raise ValueError(f"expected a value, got {item!r}")
        argv += [spec.flag, str(item)]
    try:
        context = spec.command.make_context("quantize", argv)  # type: ignore[attr-defined]
    except Exception as exc:  # click's usage errors, from whichever click Typer uses
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise ValueError(message) from None
    converted = context.params[spec.param_name]
    return list(converted) if spec.multiple else converted


def _normalize_keys(mapping: dict, where: str, source: Path) -> dict:
    normalized: dict = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise BadInputError(f"{source}: {where}: key {key!r} is not a name")
        name = key.replace("-", "_")
        if name in normalized:
            raise BadInputError(f"{source}: {where}, key {key!r}: given twice (dashes and underscores)")
        normalized[name] = value
    return normalized


def model_name(model: str) -> str:
    """``{name}``: the model's own name (the folder's, or where that is generic such as ``model``, the hub
    repository's or the model card's title; a hub id's last part): :func:`qconvert.naming.model_name`."""
    from qconvert.naming import model_name as own_name

    return own_name(model)


def _expand(template: str, name: str, scheme: str) -> str:
    """Fill ``{name}`` and ``{scheme}``; anything else between braces is an error (ValueError)."""
    for _, field_name, spec, conversion in string.Formatter().parse(template):
        if field_name is None:
            continue
        if field_name not in TEMPLATE_FIELDS or spec or conversion:
            raise ValueError(f"unknown template field {{{field_name}}} (use {{name}} and {{scheme}})")
    return template.format(name=name, scheme=scheme)


def load_jobs(path: Path, options: dict[str, OptionSpec]) -> list[Job]:
    """Read and validate the whole job file; every defect is one line naming the job and the key. ``options``: the
    quantize command's options (:func:`option_specs`)."""
    import yaml

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: cannot read the job file ({getattr(exc, 'strerror', None) or exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise BadInputError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected a mapping with 'jobs' (and optionally 'defaults')")
    for key in data:
        if key not in TOP_KEYS:
            raise BadInputError(f"{path}: unknown top-level key {key!r} (expected: {', '.join(TOP_KEYS)})")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise BadInputError(f"{path}: defaults: expected a mapping of quantize options")
    entries = data.get("jobs")
    if not isinstance(entries, list) or not entries:
        raise BadInputError(f"{path}: jobs: expected a non-empty list of jobs")

    defaults = _normalize_keys(defaults, "defaults", path)
    for key in defaults:
        if key in JOB_ONLY_KEYS:
            raise BadInputError(f"{path}: defaults, key {key!r}: belongs in each job, not in defaults")
        if key != "schemes":
            _check_key(key, options, path, "defaults")
    if "scheme" in defaults and "schemes" in defaults:
        raise BadInputError(f"{path}: defaults, key 'schemes': give either scheme or schemes, not both")

    jobs: list[Job] = []
    owners: dict[Path, str] = {}
    for index, entry in enumerate(entries):
        model = entry.get("model") if isinstance(entry, dict) else None
        label = f"jobs[{index}]" + (f" ({model})" if isinstance(model, str) else "")
        if not isinstance(entry, dict):
            raise BadInputError(f"{path}: {label}: expected a mapping with a 'model' key")
        if not isinstance(model, str) or not model.strip():
            raise BadInputError(f"{path}: {label}, key 'model': expected the model folder or hub id")
        job_keys = _normalize_keys(entry, label, path)
        for key in job_keys:
            if key not in (*JOB_ONLY_KEYS, "schemes"):
                _check_key(key, options, path, label)
        job = _build_job(index, model, defaults, job_keys, options, path, label)
        for output in job.outputs:
            other = owners.get(output.target)
            if other is not None:
                raise BadInputError(f"{path}: {label}, key 'output': {output.target} is also written by {other}")
            owners[output.target] = f"{label} scheme {output.scheme}"
        jobs.append(job)
    local_models = [(Path(job.model).expanduser(), job.label) for job in jobs]
    inputs = {model.resolve(): label for model, label in local_models if model.exists()}
    for job in jobs:
        for output in job.outputs:
            for source, owner in inputs.items():
                if output.target == source or source in output.target.parents or output.target in source.parents:
                    raise BadInputError(f"{path}: {job.label}, key 'output': {output.target} overlaps the input "
                                        f"of {owner}")
    return jobs


def _check_key(key: str, options: dict[str, OptionSpec], path: Path, label: str) -> None:
    if key in BATCH_LEVEL:
        raise BadInputError(f"{path}: {label}, key {key!r}: not a job option (use batch {BATCH_LEVEL[key]})")
    if key not in options:
        raise BadInputError(f"{path}: {label}, key {key!r}: unknown option (quantize options by their long name: "
                            f"{', '.join(sorted(k for k in options if k not in BATCH_LEVEL))}; and schemes)")


def _build_job(index: int, model: str, defaults: dict, job_keys: dict, options: dict[str, OptionSpec], path: Path,
               label: str) -> Job:
    def bad(key: str, message: str) -> BadInputError:
        origin = " (from defaults)" if key not in job_keys and key in defaults else ""
        return BadInputError(f"{path}: {label}, key {key!r}{origin}: {message}")

    if "scheme" in job_keys and "schemes" in job_keys:
        raise bad("schemes", "give either scheme or schemes, not both")
    # the job's own scheme(s) win over the defaults' scheme(s)
    source = job_keys if any(k in job_keys for k in SCHEME_KEYS) else defaults
    merged = {k: v for k, v in {**defaults, **job_keys}.items() if k not in (*JOB_ONLY_KEYS, *SCHEME_KEYS)}
    merged.update({k: source[k] for k in SCHEME_KEYS if k in source})
    values: dict = {}
    for key, raw in merged.items():
        if key == "schemes":
            continue
        try:
            values[key] = _convert(options[key], raw)
        except ValueError as exc:
            raise bad(key, str(exc)) from None
    if "schemes" in merged:
        raw = merged["schemes"]
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not raw or not all(isinstance(s, str) and s for s in raw):
            raise bad("schemes", "expected a non-empty list of scheme names")
        schemes, scheme_key = list(raw), "schemes"
    else:
        schemes, scheme_key = [values.pop("scheme", options["scheme"].default)], "scheme"
    for scheme in schemes:
        if schemes.count(scheme) > 1:
            raise bad(scheme_key, f"scheme {scheme!r} is given twice")

    name = model_name(model)
    template = values.pop("output", None)
    local = Path(model).expanduser()
    outputs: list[JobOutput] = []
    for scheme in schemes:
        if template is None:  # quantize's default: MODEL-SCHEME beside a local input, ./NAME-SCHEME for a hub id
            target = (local.resolve().parent if local.exists() else Path.cwd()) / f"{name}-{scheme}"
        else:
            try:
                target = Path(_expand(str(template), name, scheme)).expanduser()
            except (ValueError, IndexError) as exc:
                raise bad("output", str(exc) or "bad template") from None
        target = target.resolve() if target.is_absolute() else (Path.cwd() / target).resolve()
        if any(output.target == target for output in outputs):
            raise bad("output", f"every scheme would write {target}: put {{scheme}} in the output template")
        request = build_request(model, scheme, target, values, bad, scheme_key)
        outputs.append(JobOutput(scheme, target, request, fingerprint_options(request)))
    return Job(index, model, outputs)


def build_request(model: str, scheme: str, target: Path, values: dict,
                  bad: Callable[[str, str], BadInputError], scheme_key: str = "scheme") -> QuantizeRequest:
    """The :class:`QuantizeRequest` that ``qconvert quantize`` would build from these options, parsed by
    the commands' own parsers (qconvert.options); a failure names the key it came from."""
    from qconvert.options import fuse_patterns, parse_overrides
    from qconvert.schemes import get_scheme
    from qconvert.units import DEFAULT_FUSED_PATTERNS
    from qconvert.writing import parse_size

    values = dict(values)
    handled: dict = {}

    def step(key: str, convert: Callable[[], object]) -> object:
        try:
            return convert()
        except BadInputError as exc:
            raise bad(key, str(exc)) from None

    group_size = values.pop("group_size", None)
    handled["scheme"] = step("group_size" if group_size is not None else scheme_key,
                             lambda: get_scheme(scheme, group_size))
    override, overrides_file = values.pop("override", None) or [], values.pop("overrides", None)
    handled["overrides"] = step("override" if override else "overrides",
                                lambda: parse_overrides(list(override), overrides_file))
    fuse = values.pop("fuse", None)
    handled["fused_patterns"] = step("fuse", lambda: fuse_patterns(fuse) if fuse else list(DEFAULT_FUSED_PATTERNS))
    handled["max_shard_bytes"] = step("max_shard_size", lambda: parse_size(values.pop("max_shard_size", "5GB")))
    request_fields = {f.name for f in dataclasses.fields(QuantizeRequest)}
    for key, value in values.items():
        if key not in request_fields or key in ("model", "output", "overrides", "scheme"):
            raise bad(key, "this quantize option is not supported in batch jobs")
        handled[key] = list(value) if isinstance(value, (list, tuple)) else value
    request = QuantizeRequest(model=model, output=target, show_progress=False, **handled)  # type: ignore[arg-type]
    from qconvert.format import LAYOUTS

    if request.layout not in LAYOUTS:
        raise bad("layout", f"{request.layout!r}: choose from {', '.join(LAYOUTS)}")
    return request


def fingerprint_options(request: QuantizeRequest) -> dict:
    return {f.name: _plain(getattr(request, f.name)) for f in dataclasses.fields(request)
            if f.name not in NOT_FINGERPRINTED}


def _plain(value: object) -> object:
    """A JSON-able rendering of a request value (schemes, paths, tuples, enums)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


# ---------------------------------------------------------------------------------------------------
# Running jobs


def row(job: Job, output: JobOutput, status: Status, *, exit_code: int = EXIT_OK, error: str | None = None,
        seconds: float = 0.0, bytes_in: int = 0, bytes_out: int = 0, **extra: object) -> dict:
    """One report line: the keys every consumer may rely on, then what the quantize summary adds."""
    return {"job": job.index, "model": job.model, "scheme": output.scheme, "output": str(output.target),
            "status": status.value, "exit_code": exit_code, "error": error, "seconds": round(seconds, 3),
            "bytes_in": bytes_in, "bytes_out": bytes_out, **extra}


def describe(exc: BaseException) -> tuple[str, int]:
    """The one line and the exit code a failure gets (as ``qconvert quantize`` would print them)."""
    if isinstance(exc, QConvertError):
        return str(exc), exc.exit_code
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"unexpected {type(exc).__name__}: {message}", EXIT_FAILURE


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@dataclass
class _Pending:
    output: JobOutput
    key: str
    notes: list[str] = field(default_factory=list)


def run_job(job: Job, settings: Settings, advance: Callable[[int], None] | None = None,
            cancel: threading.Event | None = None) -> list[dict]:
    """Every output of one job: skipped when up to date, otherwise built from one read of the model.

    Returns one report row per output, in the job's order. Only interrupts escape. The outputs' locks
    (taken when each output is planned) are held for the job and released when it ends.
    """
    with run_guard():
        return _run_job(job, settings, advance, cancel)


def _run_job(job: Job, settings: Settings, advance: Callable[[int], None] | None,
             cancel: threading.Event | None) -> list[dict]:
    from qconvert.checkpoint import resolve_source

    started = time.perf_counter()
    rows: dict[str, dict] = {}
    pending: list[_Pending] = []
    try:
        source = resolve_source(job.model, job.outputs[0].request.revision)
        files = input_files(source)
    except Exception as exc:
        message, code = describe(exc)
        return [row(job, o, Status.FAILED, exit_code=code, error=message, seconds=time.perf_counter() - started)
                for o in job.outputs]
    for output in job.outputs:
        key = digest(files, output.options, __version__)
        if not settings.force and is_up_to_date(output.target, key):
            rows[output.scheme] = row(job, output, Status.SKIPPED, reason="up to date")
        else:
            pending.append(_Pending(output, key))

    prepared = []
    for item in pending:
        request = item.output.request
        # An output that batch wrote before (it holds a fingerprint) is ours to replace; a folder it did not
        # write is replaced only with the job's own `overwrite: true`, as with quantize.
        ours = read_fingerprint(item.output.target) is not None
        request = replace(request, overwrite=request.overwrite or ours, dry_run=settings.dry_run)
        try:
            prepared.append((item, prepare_quantize(request, item.notes.append)))
        except (KeyboardInterrupt, Cancelled):
            raise
        except Exception as exc:
            message, code = describe(exc)
            rows[item.output.scheme] = row(job, item.output, Status.FAILED, exit_code=code, error=message,
                                           seconds=time.perf_counter() - started, notes=item.notes)

    if settings.dry_run:
        for item, plan in prepared:
            summary = summarize(plan.checkpoint, plan.units, plan.target, [], 0.0, plan=plan.plan, dry_run=True,
                                **plan.summary_extra)
            rows[item.output.scheme] = row(
                job, item.output, Status.OK, seconds=time.perf_counter() - started,
                bytes_in=plan.checkpoint.tensor_bytes, bytes_out=summary["bytes_after"], dry_run=True,
                action="build", **_summary_extras(summary), notes=item.notes)
        return [rows[o.scheme] for o in job.outputs]

    outputs = []
    for item, plan in prepared:
        def finish(folder: Path, item: _Pending = item) -> None:
            write_fingerprint(folder, item.key, job.model, item.output.options, __version__)

        outputs.append(Output(plan.checkpoint, plan.units, plan.target, plan.config,
                              item.output.request.max_shard_bytes, finish))
    job_notes: list[str] = []
    read_bytes = write_outputs(outputs, job_notes.append, advance, cancel) if outputs else 0
    elapsed = time.perf_counter() - started
    for (item, plan), output in zip(prepared, outputs, strict=True):
        notes = item.notes + job_notes
        if output.error is not None:
            message, code = describe(output.error)
            rows[item.output.scheme] = row(job, item.output, Status.FAILED, exit_code=code, error=message,
                                           seconds=elapsed, notes=notes)
            continue
        summary = summarize(plan.checkpoint, plan.units, plan.target, output.shards, elapsed, plan=plan.plan,
                            **plan.summary_extra)
        rows[item.output.scheme] = row(
            job, item.output, Status.OK, seconds=elapsed, bytes_in=output.bytes_in,
            bytes_out=folder_bytes(item.output.target), **_summary_extras(summary), notes=notes)
    if len(outputs) > 1:  # what the one read saved: the bytes this job read, for all its outputs together
        for item, _ in prepared:
            if rows[item.output.scheme]["status"] == Status.OK.value:
                rows[item.output.scheme]["job_bytes_read"] = read_bytes
    return [rows[o.scheme] for o in job.outputs]


def _summary_extras(summary: dict) -> dict:
    return {key: summary[key] for key in SUMMARY_KEYS if key in summary}


def not_run(job: Job, reason: str) -> list[dict]:
    return [row(job, output, Status.SKIPPED, reason=reason) for output in job.outputs]


def stops_the_rest(rows: list[dict], settings: Settings) -> bool:
    """``--fail-fast`` and one of these outputs failed: no further job starts."""
    return settings.fail_fast and any(r["status"] == Status.FAILED.value for r in rows)


def report_not_started(jobs: list[Job], on_rows: Callable[[list[dict]], None]) -> None:
    """The jobs ``--fail-fast`` kept from starting, reported as skipped."""
    for job in jobs:
        on_rows(not_run(job, "not run: an earlier job failed (--fail-fast)"))


def exit_code(rows: list[dict]) -> int:
    """0 when nothing failed, 2 when every failure was bad input, 1 otherwise."""
    failed = [r for r in rows if r["status"] == Status.FAILED.value]
    if not failed:
        return EXIT_OK
    return EXIT_BAD_INPUT if all(r["exit_code"] == EXIT_BAD_INPUT for r in failed) else EXIT_FAILURE


def summary_line(rows: list[dict], jobs: int, seconds: float, dry_run: bool) -> dict:
    counts = {status.value: sum(r["status"] == status.value for r in rows) for status in Status}
    read = 0
    seen: set[tuple[int, int]] = set()
    for r in rows:  # a job that fanned out read its model once, whatever the number of its outputs
        if "job_bytes_read" in r:
            if (r["job"], r["job_bytes_read"]) not in seen:
                seen.add((r["job"], r["job_bytes_read"]))
                read += r["job_bytes_read"]
        else:
            read += r["bytes_in"]
    return {"summary": {"jobs": jobs, "outputs": len(rows), **counts, "exit_code": exit_code(rows),
                        "seconds": round(seconds, 3), "bytes_in": read,
                        "bytes_out": sum(r["bytes_out"] for r in rows if not r.get("dry_run")),
                        "dry_run": dry_run, "qconvert_version": __version__}}


def run_local(jobs: list[Job], settings: Settings, concurrency: int, on_rows: Callable[[list[dict]], None],
              advance: Callable[[int], None] | None = None) -> None:
    """Run the jobs on this machine, ``concurrency`` at a time (threads: the work is in torch and in
    system calls, which release the GIL). With ``fail_fast``, no job starts after a failure; running
    ones finish. An interrupt stops every job, which removes its temporary folders, and is re-raised."""
    if concurrency <= 1:
        # In this thread: large tensors allocated off the main thread come from fresh mmaps every time
        # (glibc's per-thread arenas), which measured ~1.7x the CPU time of a single run.
        for position, job in enumerate(jobs):
            rows = run_job(job, settings, advance)
            on_rows(rows)
            if stops_the_rest(rows, settings):
                report_not_started(jobs[position + 1:], on_rows)
                return
        return
    cancel = threading.Event()
    stop = False
    queue = list(jobs)
    running: dict[Future, Job] = {}
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="qconvert-job") as pool:
        try:
            while queue or running:
                while queue and not stop and len(running) < max(1, concurrency):
                    job = queue.pop(0)
                    running[pool.submit(run_job, job, settings, advance, cancel)] = job
                if stop and not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    job = running.pop(future)
                    rows = future.result()
                    on_rows(rows)
                    stop = stop or stops_the_rest(rows, settings)
            report_not_started(queue, on_rows)
        except BaseException:
            cancel.set()  # running jobs stop at their next tensor and remove their temporary folders
            wait(running)
            raise
