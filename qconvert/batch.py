"""``qconvert batch``: many conversions from one job file, for unattended (CI) use.

One pipeline with ``qconvert quantize``, by construction:

* The job file is read with limits (:func:`read_job_file`) and validated entirely before any work: every
  job's request is built by the function that builds quantize's (:func:`qconvert.options.quantize_request`,
  which checks every option value), and every input and output place of every job, and the report, is checked
  by (device, inode) as quantize checks its own (:func:`check_job_places`): no two outputs share or nest, no
  output touches an input, no job reads another's output (chains are refused), no output is a folder batch
  did not write unless the job says ``overwrite: true``.
* Each output is then planned by :func:`qconvert.pipeline.prepare_quantize`, quantize's own reader, strict
  checks, output lock, stray-name, copy and free-space checks; the free space for all outputs together is
  checked before the first is written.
* A job with several schemes reads its model once (:mod:`qconvert.fanout`, byte-identical to quantize's
  writer); an output with ``resume: true`` is written by quantize's writer itself, whose journal lets a rerun
  reuse the shards a dead run finished. An output whose fingerprint (:mod:`qconvert.fingerprint`) matches is
  skipped.

Each output gives one report row; :func:`run_job` is the same code whether it runs here or as a Ray task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import stat
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
from qconvert.pipeline import PreparedQuantize, QuantizeRequest, prepare_quantize, summarize
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


MAX_JOB_FILE_BYTES = 1 << 20  # a job file is a few lines per job: anything near this is not one
MAX_JOB_FILE_DEPTH = 16  # defaults/jobs, a job, a list value: a handful of levels is all a job file has


def read_job_file(path: Path) -> object:
    """The job file's YAML, read with limits: a regular file only (checked before opening: a FIFO or a device
    would block or never end), at most :data:`MAX_JOB_FILE_BYTES`, nested at most :data:`MAX_JOB_FILE_DEPTH`
    levels, and no aliases (``*name``: an alias bomb expands a few lines into gigabytes). Every refusal is
    one line naming the file."""
    import yaml

    from qconvert.safetensors_io import open_regular

    try:
        info = os.stat(path)
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read the job file ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise BadInputError(f"{path}: the job file is not a regular file")
    if info.st_size > MAX_JOB_FILE_BYTES:
        raise BadInputError(f"{path}: the job file is {info.st_size} bytes; at most {MAX_JOB_FILE_BYTES} are read")
    with os.fdopen(open_regular(path), "rb") as f:  # a regular file checked again once open
        try:
            data = f.read(MAX_JOB_FILE_BYTES + 1)
        except OSError as exc:
            raise BadInputError(f"{path}: cannot read the job file ({exc.strerror or exc})") from None
    if len(data) > MAX_JOB_FILE_BYTES:
        raise BadInputError(f"{path}: the job file is over {MAX_JOB_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{path}: the job file is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    loader = _job_loader()(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [""])[0]
        raise BadInputError(f"{path}: not valid YAML{where}: {problem}") from None
    finally:
        loader.dispose()


@functools.cache
def _job_loader() -> type:
    import yaml

    class JobLoader(yaml.SafeLoader):
        """PyYAML's safe loader that refuses aliases and deep nesting while composing, before anything is
        expanded or recursed into."""

        depth = 0

        def compose_node(self, parent: object, index: object) -> object:
            if self.check_event(yaml.AliasEvent):
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a job file",
                                                  self.peek_event().start_mark)
            self.depth += 1
            try:
                if self.depth > MAX_JOB_FILE_DEPTH:
                    raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_JOB_FILE_DEPTH} levels",
                                                      self.peek_event().start_mark)
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return JobLoader


def load_jobs(path: Path, options: dict[str, OptionSpec], *, check_device: bool = True,
              check_places: bool = True, dry_run: bool = False, report: Path | None = None) -> list[Job]:
    """Read and validate the whole job file; every defect is one line naming the job and the key. ``options``: the
    quantize command's options (:func:`option_specs`). Every option value is checked as ``quantize`` checks it;
    with ``check_places``, so is every input and output place (:func:`check_places`), and ``report``."""
    data = read_job_file(path)
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
        jobs.append(_build_job(index, model, defaults, job_keys, options, path, label, check_device))
    if check_places:
        check_job_places(path, jobs, dry_run, report)
    return jobs


# ---------------------------------------------------------------------------------------------------
# Places: every input and output of the file, and the report, compared by (device, inode) as quantize does


Place = tuple[tuple[int, int], tuple[str, ...]]


def place_of(path: Path) -> Place:
    """Where ``path`` is, however it is spelled (a link, a bind mount): the (device, inode) of its deepest
    existing folder (links followed), and the names below it that do not exist yet."""
    path = Path(os.path.abspath(path))
    missing: list[str] = []
    while True:
        try:
            info = os.stat(path)
            return (info.st_dev, info.st_ino), tuple(reversed(missing))
        except OSError:
            if path.parent == path:
                return (0, 0), tuple(reversed(missing))
            missing.append(path.name)
            path = path.parent


def _within(path: Path) -> set[Place]:
    """The places of ``path`` and of every folder that holds it."""
    path = Path(os.path.abspath(path))
    return {place_of(p) for p in (path, *path.parents)}


def inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or inside it (by place, not by spelling)."""
    return place_of(folder) in _within(path)


def check_job_places(path: Path, jobs: list[Job], dry_run: bool, report: Path | None = None) -> None:
    """Every place of the batch before any work: no job reads another's output (chains are refused: each job's
    input must exist before the batch starts), no output is another's or inside it, none is (inside) an input or
    holds one, each output can be written as ``quantize`` would write it, and the report is none of these."""
    from qconvert.checkpoint import resolve_source
    from qconvert.writing import check_output_location

    outputs = [(job, output) for job in jobs for output in job.outputs]
    for job in jobs:
        if not _is_local(job.model):
            continue
        for other, output in outputs:
            if other is not job and inside(Path(job.model).expanduser(), output.target):
                raise BadInputError(f"{path}: {job.label}, key 'model': {job.model} is inside the output of "
                                    f"{other.label} scheme {output.scheme} ({output.target}); a job cannot read "
                                    "what another writes (chains are not supported: run them as two batch files, "
                                    "one after the other)")
    for position, (job, output) in enumerate(outputs):
        for other, earlier in outputs[:position]:
            if place_of(output.target) == place_of(earlier.target):
                what = "is also written by"
            elif inside(output.target, earlier.target):
                what = "is inside the output of"
            elif inside(earlier.target, output.target):
                what = "holds the output of"
            else:
                continue
            raise BadInputError(f"{path}: {job.label}, key 'output': {output.target} {what} {other.label} scheme "
                                f"{earlier.scheme} ({earlier.target})")
    sources: list[tuple[Job, Path]] = []
    for job in jobs:
        if _is_local(job.model):
            try:
                sources.append((job, resolve_source(job.model)))
            except BadInputError as exc:
                raise BadInputError(f"{path}: {job.label}, key 'model': {exc}") from None
    for job, output in outputs:
        for other, source in sources:
            if inside(output.target, source) or inside(source, output.target):
                raise BadInputError(f"{path}: {job.label}, key 'output': {output.target} overlaps the input of "
                                    f"{other.label} ({source})")
        if not dry_run:
            own = next((s for j, s in sources if j is job), None)
            if own is not None:
                request = output.request
                overwrite = request.overwrite or read_fingerprint(output.target) is not None
                try:
                    check_output_location(own, output.target, overwrite, lock=False)
                except BadInputError as exc:
                    raise BadInputError(f"{path}: {job.label}, key 'output': {exc}") from None
    if report is not None:
        check_report_place(report, path, [s for _, s in sources], [o.target for _, o in outputs])


def _is_local(model: str) -> bool:
    """A folder, not a hub id (what :func:`qconvert.checkpoint.resolve_source` reads as a path)."""
    from qconvert.checkpoint import _HUB_ID

    return Path(model).expanduser().exists() or model.startswith((".", "/", "~")) or not _HUB_ID.match(model)


def check_report_place(report: Path, jobs_file: Path, inputs: list[Path], outputs: list[Path]) -> None:
    """``--report`` is an output like any other: never the job file, inside an input or inside an output (which
    the output's rename would replace), and a file in a folder that is, or can be, made."""
    for source in inputs:
        if inside(report, source):
            raise BadInputError(f"--report {report}: inside the input {source}; the input is never written")
    for target in outputs:
        if inside(report, target):
            raise BadInputError(f"--report {report}: inside the output {target}")
    if place_of(report) == place_of(jobs_file):
        raise BadInputError(f"--report {report}: is the job file")
    if os.path.lexists(report) and not stat.S_ISREG(os.stat(report).st_mode if os.path.exists(report) else 0):
        raise BadInputError(f"--report {report}: exists and is not a regular file")
    parent = Path(os.path.abspath(report)).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise BadInputError(f"--report {report}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"--report {report}: {parent} is not writable")


def _check_key(key: str, options: dict[str, OptionSpec], path: Path, label: str) -> None:
    if key in BATCH_LEVEL:
        raise BadInputError(f"{path}: {label}, key {key!r}: not a job option (use batch {BATCH_LEVEL[key]})")
    if key not in options:
        raise BadInputError(f"{path}: {label}, key {key!r}: unknown option (quantize options by their long name: "
                            f"{', '.join(sorted(k for k in options if k not in BATCH_LEVEL))}; and schemes)")


def _build_job(index: int, model: str, defaults: dict, job_keys: dict, options: dict[str, OptionSpec], path: Path,
               label: str, check_device: bool = True) -> Job:
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
        request = build_request(model, scheme, target, values, bad, options, scheme_key, check_device)
        outputs.append(JobOutput(scheme, target, request, fingerprint_options(request)))
    return Job(index, model, outputs)


def build_request(model: str, scheme: str, target: Path, values: dict, bad: Callable[[str, str], BadInputError],
                  options: dict[str, OptionSpec], scheme_key: str = "scheme",
                  check_device: bool = True) -> QuantizeRequest:
    """The :class:`QuantizeRequest` that ``qconvert quantize`` would build from these options: built by the same
    function (:func:`qconvert.options.quantize_request`), every value checked; a refusal names the job's key."""
    from qconvert.options import quantize_request

    key_of = {spec.param_name: spec.name for spec in options.values()}
    params = {options[key].param_name: value for key, value in values.items()}
    params.update(scheme=scheme, output=target, show_progress=False)

    def blame(param: str, exc: BadInputError) -> BadInputError:
        key = scheme_key if param == "scheme" else key_of.get(param, param)
        return bad(key, str(exc))

    try:
        return quantize_request(model, params, check_device=check_device, blame=blame)
    except TypeError as exc:  # an option of quantize that a job cannot carry (the builder does not know it)
        raise bad(next(iter(values), "?"), f"this quantize option is not supported in batch jobs ({exc})") from None


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
    prepared: PreparedQuantize | None = None


@dataclass
class Planned:
    """One job planned: the rows decided already (skipped, failed while planning), and the outputs to write."""

    job: Job
    rows: dict[str, dict]
    pending: list[_Pending]
    started: float

    @property
    def failed(self) -> bool:
        return any(r["status"] == Status.FAILED.value for r in self.rows.values())


def run_job(job: Job, settings: Settings, advance: Callable[[int], None] | None = None,
            cancel: threading.Event | None = None) -> list[dict]:
    """Every output of one job: skipped when up to date, otherwise built from one read of the model.

    Returns one report row per output, in the job's order. Only interrupts escape. The outputs' locks
    (taken when each output is planned) are held for the job and released when it ends.
    """
    with run_guard():
        planned = plan_job(job, settings)
        check_space([planned])
        return write_job(planned, settings, advance, cancel)


def plan_job(job: Job, settings: Settings) -> Planned:
    """Each output of the job through :func:`qconvert.pipeline.prepare_quantize`, the code ``quantize`` runs before
    its first write (reader, strict checks, output place and lock, stray names, files to copy, free space)."""
    from qconvert.checkpoint import resolve_source

    started = time.perf_counter()
    rows: dict[str, dict] = {}
    pending: list[_Pending] = []
    try:
        source = resolve_source(job.model, job.outputs[0].request.revision)
        files = input_files(source)
    except Exception as exc:
        message, code = describe(exc)
        return Planned(job, {o.scheme: row(job, o, Status.FAILED, exit_code=code, error=message,
                                           seconds=time.perf_counter() - started) for o in job.outputs}, [], started)
    for output in job.outputs:
        key = digest(files, output.options, __version__)
        if not settings.force and is_up_to_date(output.target, key):
            rows[output.scheme] = row(job, output, Status.SKIPPED, reason="up to date")
        else:
            pending.append(_Pending(output, key))
    for item in pending:
        request = item.output.request
        # An output that batch wrote before (it holds a fingerprint) is ours to replace; a folder it did not
        # write is replaced only with the job's own `overwrite: true`, as with quantize (and --resume, which
        # adopts what a dead run of this output left).
        ours = read_fingerprint(item.output.target) is not None
        request = replace(request, overwrite=request.overwrite or ours, dry_run=settings.dry_run)
        try:
            item.prepared = prepare_quantize(request, item.notes.append)
        except (KeyboardInterrupt, Cancelled):
            raise
        except Exception as exc:
            message, code = describe(exc)
            rows[item.output.scheme] = row(job, item.output, Status.FAILED, exit_code=code, error=message,
                                           seconds=time.perf_counter() - started, notes=item.notes)
    return Planned(job, rows, [item for item in pending if item.prepared is not None], started)


def check_space(planned: list[Planned]) -> None:
    """Free space for every output of the batch at once, before any is written (each output alone was checked
    by prepare_quantize)."""
    from qconvert.preflight import check_space_for

    check_space_for([(item.output.target, item.prepared.needed_bytes) for plan in planned for item in plan.pending
                     if item.prepared is not None and not item.output.request.dry_run])


def write_job(planned: Planned, settings: Settings, advance: Callable[[int], None] | None = None,
              cancel: threading.Event | None = None) -> list[dict]:
    """Write a planned job's outputs: several from one read (:mod:`qconvert.fanout`); an output with ``resume``
    through :func:`qconvert.pipeline.write_checkpoint` (quantize's writer, whose journal --resume reads)."""
    job, rows, started = planned.job, dict(planned.rows), planned.started
    prepared = [(item, item.prepared) for item in planned.pending if item.prepared is not None]
    if settings.dry_run:
        for item, plan in prepared:
            summary = summarize(plan.checkpoint, plan.units, plan.target, [], 0.0, plan=plan.plan, dry_run=True,
                                **plan.summary_extra)
            rows[item.output.scheme] = row(
                job, item.output, Status.OK, seconds=time.perf_counter() - started,
                bytes_in=plan.checkpoint.tensor_bytes, bytes_out=summary["bytes_after"], dry_run=True,
                action="build", **_summary_extras(summary), notes=item.notes)
        return [rows[o.scheme] for o in job.outputs]

    fanned = [(item, plan) for item, plan in prepared if not item.output.request.resume]
    outputs = []
    for item, plan in fanned:
        outputs.append(Output(plan.checkpoint, plan.units, plan.target, plan.config,
                              item.output.request.max_shard_bytes, _finisher(job, item)))
    job_notes: list[str] = []
    read_bytes = write_outputs(outputs, job_notes.append, advance, cancel) if outputs else 0
    results: list[tuple[_Pending, PreparedQuantize, list[str], int, BaseException | None]] = [
        (item, plan, output.shards, output.bytes_in, output.error)
        for (item, plan), output in zip(fanned, outputs, strict=True)]
    for item, plan in prepared:
        if item.output.request.resume:
            results.append((item, plan, *_write_resumable(job, item, plan, advance)))
    elapsed = time.perf_counter() - started
    for item, plan, shards, bytes_in, error in results:
        notes = item.notes + job_notes
        if error is not None:
            message, code = describe(error)
            rows[item.output.scheme] = row(job, item.output, Status.FAILED, exit_code=code, error=message,
                                           seconds=elapsed, notes=notes)
            continue
        summary = summarize(plan.checkpoint, plan.units, plan.target, shards, elapsed, plan=plan.plan,
                            **plan.summary_extra)
        rows[item.output.scheme] = row(
            job, item.output, Status.OK, seconds=elapsed, bytes_in=bytes_in,
            bytes_out=folder_bytes(item.output.target), **_summary_extras(summary), notes=notes)
    if len(outputs) > 1:  # what the one read saved: the bytes this job read, for all its outputs together
        for item, _ in fanned:
            if rows[item.output.scheme]["status"] == Status.OK.value:
                rows[item.output.scheme]["job_bytes_read"] = read_bytes
    return [rows[o.scheme] for o in job.outputs]


def _finisher(job: Job, item: _Pending) -> Callable[[Path], None]:
    def finish(folder: Path) -> None:
        write_fingerprint(folder, item.key, job.model, item.output.options, __version__)

    return finish


def _write_resumable(job: Job, item: _Pending, plan: PreparedQuantize, advance: Callable[[int], None] | None
                     ) -> tuple[list[str], int, BaseException | None]:
    from qconvert.pipeline import write_checkpoint
    from qconvert.preflight import job_options

    request = item.output.request
    bytes_in = sum(unit.input_bytes for unit in plan.units) + sum(
        (plan.checkpoint.root / rel).stat().st_size for rel in plan.checkpoint.other_files)
    try:
        shards = write_checkpoint(plan.checkpoint, plan.units, plan.target, plan.config, request.max_shard_bytes,
                                  False, item.notes.append, resume=True, options=job_options(request),
                                  settings=plan.settings, finish=_finisher(job, item))
    except (KeyboardInterrupt, Cancelled):
        raise
    except Exception as exc:
        return [], bytes_in, exc
    if advance is not None:
        advance(bytes_in)
    return shards, bytes_in, None


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
    """Run the jobs on this machine: every job planned first (each output through quantize's checks), the free
    space for all outputs checked at once, then the writes, ``concurrency`` jobs at a time (threads: the work is
    in torch and in system calls, which release the GIL). With ``fail_fast``, no job starts after a failure;
    running ones finish. An interrupt stops every job, which removes its temporary folders, and is re-raised."""
    with run_guard():  # every output's lock, taken while planning, held until the batch ends
        planned: list[Planned] = []
        for job in jobs:
            planned.append(plan_job(job, settings))
            if stops_the_rest(list(planned[-1].rows.values()), settings):
                break
        check_space(planned)
        _write_all(planned, jobs[len(planned):], settings, concurrency, on_rows, advance)


def _write_all(planned: list[Planned], not_planned: list[Job], settings: Settings, concurrency: int,
               on_rows: Callable[[list[dict]], None], advance: Callable[[int], None] | None) -> None:
    if concurrency <= 1:
        # In this thread: large tensors allocated off the main thread come from fresh mmaps every time
        # (glibc's per-thread arenas), which measured ~1.7x the CPU time of a single run.
        for position, plan in enumerate(planned):
            rows = write_job(plan, settings, advance)
            on_rows(rows)
            if stops_the_rest(rows, settings):
                report_not_started([p.job for p in planned[position + 1:]] + not_planned, on_rows)
                return
        report_not_started(not_planned, on_rows)
        return
    cancel = threading.Event()
    stop = False
    queue = list(planned)
    running: dict[Future, Planned] = {}
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="qconvert-job") as pool:
        try:
            while queue or running:
                while queue and not stop and len(running) < max(1, concurrency):
                    plan = queue.pop(0)
                    running[pool.submit(write_job, plan, settings, advance, cancel)] = plan
                if stop and not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    running.pop(future)
                    rows = future.result()
                    on_rows(rows)
                    stop = stop or stops_the_rest(rows, settings)
            report_not_started([p.job for p in queue] + not_planned, on_rows)
        except BaseException:
            cancel.set()  # running jobs stop at their next tensor and remove their temporary folders
            wait(running)
            raise


class Report:
    """``--report``: JSON lines written to a temporary file beside the report and renamed onto it at the end,
    so the report is complete or absent; a failure to write it is one line (exit 2), and never leaves the
    temporary file behind."""

    def __init__(self, path: Path):
        self.path = Path(os.path.abspath(path))
        self.temp = self.path.parent / f".{self.path.name[:100]}.qconvert-{os.getpid()}.tmp"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.temp, "x")  # noqa: SIM115 - closed by commit or abandon
        except OSError as exc:
            raise BadInputError(f"--report {path}: cannot write the report ({exc.strerror or exc})") from None

    def write(self, line: str) -> None:
        try:
            self._file.write(line + "\n")
            self._file.flush()
        except OSError as exc:
            raise BadInputError(f"--report {self.path}: cannot write the report ({exc.strerror or exc})") from None

    def commit(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.temp, self.path)
        except OSError as exc:
            raise BadInputError(f"--report {self.path}: cannot write the report ({exc.strerror or exc})") from None

    def abandon(self) -> None:
        """Remove the temporary file when the report was not committed (a no-op after :meth:`commit`)."""
        if not self._file.closed:
            with contextlib.suppress(OSError):
                self._file.close()
        with contextlib.suppress(OSError):
            self.temp.unlink()
