"""The ``qconvert`` command line: a thin shell over the pipeline, inspection and scheme table.

Exit codes: 0 success, 2 bad input or usage (one line on stderr), 1 anything else (including an
interrupt); ``verify`` uses 1 for a failed check and 3 for an internal error. ``--debug`` (or
``QCONVERT_DEBUG=1``) shows tracebacks.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import qconvert
from qconvert import __version__
from qconvert.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERNAL, QConvertError, one_line
from qconvert.scheme_catalog import NAMES as SCHEME_NAMES

try:  # Typer >= 0.25 vendors click; its usage errors derive from TyperException
    from typer import TyperException as UsageError
except ImportError:  # older Typer runs on click itself
    from click import ClickException as UsageError  # type: ignore[assignment]

app = typer.Typer(
    name="qconvert",
    help="Quantize and convert LLM checkpoints into compressed-tensors, streaming tensor by tensor.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Not on a terminal: 200 columns, unless COLUMNS says otherwise (rich reads it).
out = Console(highlight=False, soft_wrap=True,
              width=None if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)  # names are printed as they are

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON document on stdout.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback of any error.")]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="Where tensors are quantized: auto (a CUDA GPU when torch sees one), cpu, "
                      "cuda or cuda:N. The output is byte-identical on every device.")
]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", help="Parallel read/write threads (default: one per core, 2 to 8).")
]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def _emit_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="Model folder, or a Hugging Face hub id.")],
    scheme: Annotated[str, typer.Option("--scheme", "-s", help=f"Scheme: {', '.join(SCHEME_NAMES)} "
                                        "(`qconvert schemes` says what each writes and where it loads).")] = "rtn4",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output folder (default: MODEL-SCHEME beside the input).")
    ] = None,
    group_size: Annotated[
        int | None, typer.Option("--group-size", help="Inputs per scale; -1 for one scale per channel.")
    ] = None,
    algorithm: Annotated[
        str, typer.Option("--algorithm", help="How scales are chosen: rtn (round to nearest, the reference "
                          "tools' bytes) or search (per-group scale/zero search, never worse than rtn).")
    ] = "rtn",
    ignore: Annotated[
        list[str] | None,
        typer.Option("--ignore", help="Leave a module unquantized: exact name or re:REGEX (repeatable)."),
    ] = None,
    targets: Annotated[
        list[str] | None,
        typer.Option("--targets", help="Quantize only these modules: exact name or re:REGEX (repeatable)."),
    ] = None,
    override: Annotated[
        list[str] | None,
        typer.Option("--override", help="PATTERN=SCHEME: another scheme (or none) for matching modules; "
                     "first match wins (repeatable)."),
    ] = None,
    overrides_file: Annotated[
        Path | None, typer.Option("--overrides", help="File of PATTERN=SCHEME lines, after any --override.")
    ] = None,
    layout: Annotated[
        str, typer.Option("--layout", help="compressed-tensors, or sglang (blockwise_int8, int8-block only).")
    ] = "compressed-tensors",
    fuse: Annotated[
        list[str] | None,
        typer.Option("--fuse", help="Regex whose first group names a fused module (q/k/v, gate/up); "
                     "replaces the defaults for shared per-tensor scales (repeatable)."),
    ] = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest output shard.")] = "5GB",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag, commit).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")] = False,
    allow_requantize: Annotated[
        bool, typer.Option("--allow-requantize", help="Requantize integer-quantized inputs (loses quality).")
    ] = False,
    fnuz: Annotated[
        bool, typer.Option("--fnuz", help="Write fp8 weights as e4m3fnuz (ROCm MI300), scales doubled.")
    ] = False,
    force_layout: Annotated[
        bool, typer.Option("--force-layout", help="Write --layout sglang even for architectures whose SGLang "
                           "loader would drop its scales.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no notes.")] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Reuse the shards an interrupted run of the same "
                                         "command finished (checked by sha256).")] = False,
    include_vision: Annotated[
        bool, typer.Option("--include-vision", help="Also quantize vision/audio towers and projectors.")
    ] = False,
    keep_fused_experts: Annotated[
        bool, typer.Option("--keep-fused-experts", help="Keep 3-D fused expert tensors (gpt-oss, GraniteMoE) in "
                           "full precision instead of writing them per expert in vLLM's layout.")
    ] = False,
    min_coverage: Annotated[
        float | None, typer.Option("--min-coverage", help="Fail (exit 2) if less than this share (0-1) of the "
                                   "linear parameters would be quantized.")
    ] = None,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
) -> None:
    """Quantize a checkpoint into a new compressed-tensors checkpoint."""
    from qconvert.errors import BadInputError
    from qconvert.options import quantize_request
    from qconvert.pipeline import quantize as run

    # built by the code that builds every batch job's request too (qconvert.options)
    request = quantize_request(model, dict(
        scheme=scheme, output=output, group_size=group_size, ignore=ignore, targets=targets, override=override,
        overrides_file=overrides_file, layout=layout, fuse=fuse, max_shard_size=max_shard_size, overwrite=overwrite,
        revision=revision, dry_run=dry_run, allow_requantize=allow_requantize, fnuz=fnuz, force_layout=force_layout,
        show_progress=not quiet and not as_json, resume=resume, include_vision=include_vision,
        keep_fused_experts=keep_fused_experts, min_coverage=min_coverage, device=device, workers=workers,
        algorithm=algorithm))

    def notice(message: str) -> None:
        if not quiet:
            err.print(one_line(message), markup=False)

    try:
        summary = run(request, notice)
    except BadInputError as exc:
        planned = getattr(exc, "plan_summary", None)  # a dry run refused by --min-coverage: show its plan first
        if planned is not None and as_json:
            _emit_json(planned)
        elif planned is not None:
            _print_plan(planned)
        raise
    if as_json:
        _emit_json(summary)
        return
    if dry_run:
        _print_plan(summary)
        return
    out.print(
        f"wrote {summary['output']}: {summary['quantized_layers']} layers {'+'.join(summary['schemes'])}, "
        f"{_human_bytes(summary['bytes_before'])} -> {_human_bytes(summary['bytes_after'])} "
        f"({summary['compression_ratio']:.2f}x), {summary['bits_per_weight']:.2f} bits per quantized weight, "
        f"{summary['seconds']:.1f} s",
        markup=False,
    )
    _print_coverage(summary)


def _print_plan(summary: dict) -> None:
    table = Table(title=escape(f"plan for {summary['input']} -> {summary['output']} (dry run, nothing written)"),
                  title_justify="left")
    for column, justify in (("layer", "left"), ("scheme", "left"), ("shape", "right"), ("bytes before", "right"),
                            ("bytes after", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    rows = [[layer["module"], f"{layer['scheme']} ({layer['label']})", "x".join(map(str, layer["shape"])),
             _human_bytes(layer["bytes_before"]), _human_bytes(layer["bytes_after"])] for layer in summary["layers"]]
    rows += [[skipped["module"], f"unquantized: {skipped['reason']}", "x".join(map(str, skipped["shape"])), "", ""]
             for skipped in summary.get("skipped", [])]
    _add_rows(table, rows)
    out.print(table, soft_wrap=False)  # soft wrap would keep every cell on one line
    out.print(
        f"{summary['quantized_layers']} layers quantized; {_human_bytes(summary['bytes_before'])} -> "
        f"{_human_bytes(summary['bytes_after'])} ({summary['compression_ratio']:.2f}x); "
        f"{summary['bits_per_weight']:.2f} bits per quantized weight, "
        f"{summary['bits_per_param_overall']:.2f} bits per parameter overall",
        markup=False,
    )
    _print_coverage(summary)


def _print_coverage(summary: dict) -> None:
    from qconvert.pipeline import describe_coverage

    if summary.get("coverage", {}).get("share") is not None:
        out.print(f"coverage: {describe_coverage(summary['coverage'])}", markup=False)


@app.command()
def convert(
    model: Annotated[str, typer.Argument(help="Quantized checkpoint folder, or a Hugging Face hub id.")],
    op: Annotated[str, typer.Option("--op", help="fnuz | shared-scale | pack | dequantize")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output folder (default: MODEL-OP beside the input).")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="dequantize: dtype of the rebuilt weights.")] = "",
    fuse: Annotated[
        list[str] | None,
        typer.Option("--fuse", help="shared-scale: regex whose first group names a fused module (repeatable)."),
    ] = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest output shard.")] = "5GB",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag, commit).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no notes.")] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Reuse the shards an interrupted run of the same "
                                         "command finished (checked by sha256).")] = False,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
) -> None:
    """Convert a quantized checkpoint: fnuz (ROCm), shared-scale (fused FP8), pack (int8 -> int32), dequantize."""
    from qconvert.errors import BadInputError
    from qconvert.options import fuse_patterns
    from qconvert.pipeline import ConvertRequest
    from qconvert.pipeline import convert as run
    from qconvert.writing import parse_size

    dtypes = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
              "fp32": "float32", "float32": "float32"}
    if dtype and dtype not in dtypes:
        raise BadInputError(f"--dtype {dtype!r}: choose from bf16, fp16, fp32")
    import torch

    request = ConvertRequest(
        model=model, op=op, output=output,
        fused_patterns=fuse_patterns(fuse) if fuse else None,
        dtype=getattr(torch, dtypes[dtype]) if dtype else (torch.bfloat16 if op == "dequantize" else None),
        max_shard_bytes=parse_size(max_shard_size), overwrite=overwrite, revision=revision,
        show_progress=not quiet and not as_json, resume=resume, device=device, workers=workers,
    )
    summary = run(request, lambda message: None if quiet else err.print(one_line(message), markup=False))
    if as_json:
        _emit_json(summary)
        return
    if summary.get("unchanged"):
        out.print(f"nothing written: --op {op} would change nothing ({summary['unchanged']})", markup=False)
        return
    out.print(f"wrote {summary['output']}: --op {op} on {len(summary['converted'])} layers, "
              f"{_human_bytes(summary['bytes_before'])} -> {_human_bytes(summary['bytes_after'])}, "
              f"{summary['seconds']:.1f} s", markup=False)


@app.command("inspect")
def inspect_cmd(
    path: Annotated[str, typer.Argument(help="Checkpoint folder, a .safetensors file, or a hub id.")],
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show what a checkpoint holds: per-layer scheme, shape, stored dtype and bytes, and totals."""
    from qconvert.inspection import inspect_path

    report = inspect_path(path)
    if as_json:
        _emit_json(report)
        return
    # The title (path, then format) as plain lines: a table title is cut to the table's width, and a format's
    # description (an unreadable method's, say) is longer than a narrow table.
    out.print(report["path"], markup=False, highlight=False, overflow="fold")
    out.print(f"[{report['format']}]", markup=False, highlight=False, overflow="fold")
    out.print(inspect_table(report), soft_wrap=False)
    t = report["totals"]
    bits = f"{t['bits_per_weight']:.2f} bits per quantized weight" if t["bits_per_weight"] else "no quantized layers"
    ratio = "-" if t["compression_ratio"] is None else f"{t['compression_ratio']:.2f}"  # None: no tensor bytes
    out.print(
        f"{t['layers']} layers ({t['quantized_layers']} quantized), {t['other_tensors']} other tensors; "
        f"{_human_bytes(t['bytes'])} stored, {_human_bytes(t['unquantized_bytes'])} unquantized "
        f"({ratio}x); {bits}",
        markup=False,
    )


def _natural(name: str) -> list:
    """Sort key that orders layer 2 before layer 10 (module names compared piece by piece)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def _fit_columns(table: Table, rows: list[list[str]]) -> None:
    """Give ``table``'s columns widths that fit the terminal with the first (layer) column shrunk last.

    rich shrinks the widest column first, which cuts every layer name (``model.layers.0.mlp…``): a cut name
    is no name at all. So the other columns wrap at their spaces first, down to their longest word; only then
    is the layer column narrowed, and its names folded onto more lines, never cut. ``rows`` are the cells as
    printed (before markup escaping). The table loses its outer edge for the space."""
    table.show_edge = False
    table.columns[0].overflow = "fold"
    texts = [[column.header for column in table.columns], *rows]  # type: ignore[list-item]
    natural = [max(len(str(row[i])) for row in texts) for i in range(len(table.columns))]
    floor = [max((len(word) for row in texts for word in str(row[i]).split()), default=1)
             for i in range(len(table.columns))]
    floor[0] = min(natural[0], 16)
    widths = list(natural)
    room = out.width - 3 * len(widths) + 1  # a space each side of every cell, a rule between columns
    while sum(widths) > room:  # narrow the widest other column that can still wrap, one character at a time
        shrinkable = [i for i in range(1, len(widths)) if widths[i] > floor[i]] or ([0] if widths[0] > floor[0] else [])
        if not shrinkable:
            break
        widest = max(shrinkable, key=lambda i: widths[i])
        widths[widest] -= 1
    for column, width in zip(table.columns, widths, strict=True):
        column.width = width


def inspect_table(report: dict) -> Table:
    """``inspect``'s table (its title, the path and format, is printed before it); its rows in module order
    (layer 2 before layer 10) whatever the scheme wrote first. Every text from the checkpoint is escaped: rich
    would read ``[compressed-tensors ...]`` as markup."""
    table = Table()
    for column, justify in (("layer", "left"), ("scheme", "left"), ("shape", "right"), ("stored as", "left"),
                            ("bytes", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    rows = [[layer["module"], layer["scheme"], "x".join(map(str, layer["shape"])), layer["stored"],
             _human_bytes(layer["bytes"])] for layer in sorted(report["layers"], key=lambda x: _natural(x["module"]))]
    _add_rows(table, rows)
    return table


def _add_rows(table: Table, rows: list[list[str]]) -> None:
    for row in rows:
        table.add_row(*map(escape, row))
    _fit_columns(table, rows)


@app.command()
def verify(
    path: Annotated[str, typer.Argument(help="Quantized checkpoint folder, or a hub id.")],
    original: Annotated[
        str | None, typer.Option("--original", help="The unquantized checkpoint: also check the stored weights.")
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="cuda or cpu (default: cuda when a GPU is visible). "
                                 "cpu runs the Triton kernels in the interpreter: small checkpoints only.")
    ] = None,
    tokens: Annotated[
        str | None, typer.Option("--tokens", help="Token counts (GEMM M) to run, comma-separated (default: "
                                 f"{GPU_TOKENS} on a GPU; {CPU_TOKENS} on the CPU, where Triton's interpreter takes "
                                 "seconds per layer and token count).")
    ] = None,
    layers: Annotated[
        str | None, typer.Option("--layers", help="Only layers whose module name matches this regex (re.search).")
    ] = None,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Run each quantized layer's serving kernels on a GPU against dequantized references.

    Exit 0 when every check passes, 1 when any fails, 2 for bad input, 3 when verify itself crashed.
    """
    import torch

    if device == "cpu" or (device is None and not torch.cuda.is_available()):
        # Triton decides between compiling and interpreting when it is imported and when kernels are
        # defined: the choice must be made before anything imports triton (resolve_device does).
        os.environ["TRITON_INTERPRET"] = "1"
    from qconvert.verification import parse_tokens, resolve_device

    target = resolve_device(device)
    token_counts = parse_tokens(tokens if tokens is not None else GPU_TOKENS if target.type == "cuda" else CPU_TOKENS)
    from qconvert.verification import verify as run_verify
    from qconvert.verification import worst_first

    progress = _VerifyProgress(enabled=not (quiet or as_json))
    report = run_verify(path, original, target, token_counts, layers, on_layer=progress.layer, on_start=progress.start)
    progress.close()
    if as_json:
        _emit_json(report.to_json())
    else:
        _print_verify(report, worst_first(report.layers))
    if not report.ok:
        raise typer.Exit(EXIT_FAILURE)


GPU_TOKENS, CPU_TOKENS = "1,16,128", "1"


class _VerifyProgress:
    """verify's progress on stderr: a bar with a total and an ETA on a terminal, else a plain line with the count,
    total and time left every few seconds (a CI log shows the run advancing instead of minutes of silence)."""

    INTERVAL = 5.0  # seconds between plain lines

    def __init__(self, enabled: bool):
        self.enabled, self.terminal = enabled, sys.stderr.isatty()
        self.total, self.done, self.bar = 0, 0, None
        self.started = self.last = 0.0

    def start(self, total: int) -> None:
        import time

        self.total, self.started = total, time.perf_counter()
        self.last = self.started
        if self.enabled and self.terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="verify", unit="layer", leave=False, dynamic_ncols=True)

    def layer(self, result: object) -> None:
        import time

        self.done += 1
        if self.bar is not None:
            self.bar.update()
        elif self.enabled:
            now = time.perf_counter()
            # A line every few seconds and the last: a log that shows the run advancing, not one line per layer
            # of a fast run (nor progress lines before the one error line of bad input found early).
            if now - self.last < self.INTERVAL and self.done < self.total:
                return
            self.last, elapsed = now, now - self.started
            eta = elapsed / self.done * (self.total - self.done)
            print(one_line(f"verify: {self.done}/{self.total} layers, {elapsed:.0f} s, about {eta:.0f} s left "
                           f"({getattr(result, 'module', '')})"), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_verify(report: object, ordered: object) -> None:
    with_original = report.original is not None
    table = Table(title=escape(f"verify {report.path} on {report.device}, tokens {','.join(map(str, report.tokens))}"))
    for column in ("layer", "scheme", "kernel path", "kernel ratio", "rel err", "ok"):
        table.add_column(column, justify="right" if column in ("kernel ratio", "rel err") else "left")
    if with_original:
        for column in ("weight SNR dB", "output SNR dB", "weight bound"):
            table.add_column(column, justify="right")
    rows = []
    for layer in ordered:
        row = [layer.module, layer.scheme, layer.path, _fmt(layer.kernel_ratio, ".3f"),
               _fmt(layer.kernel_rel_error, ".1e"), "PASS" if layer.ok else "FAIL"]
        if with_original:
            row += [_fmt(layer.weight_snr_db, ".1f"), _fmt(layer.output_snr_db, ".1f"),
                    _fmt(layer.weight_bound_ratio, ".3f")]
        rows.append(row)
    _add_rows(table, rows)
    out.print(table, soft_wrap=False)  # soft wrap would keep every cell on one line
    failed = [layer for layer in report.layers if not layer.ok]
    for layer in failed:
        why = "; ".join(layer.notes) or f"kernel ratio {layer.kernel_ratio:.3g} > 1"
        out.print(f"FAIL {layer.module}: {why}", markup=False)
    summary = f"{len(report.layers) - len(failed)}/{len(report.layers)} layers pass"
    if with_original and report.layers:
        worst = min(report.layers, key=lambda layer: layer.output_snr_db)
        summary += f"; worst output SNR {worst.output_snr_db:.1f} dB ({worst.module})"
    out.print(summary, markup=False)
    if report.not_verified:
        out.print(f"note: {len(report.not_verified)} per-expert tensors in vLLM's gpt-oss spelling (e.g. "
                  f"{report.not_verified[0]}) are not verified: qconvert verify reads compressed-tensors layers only",
                  markup=False)


@app.command()
def schemes(as_json: JsonOpt = False) -> None:
    """List the schemes (what -s takes), what each one writes and which engines load it (tested by
    `make engines`), then the output variants other flags make of them."""
    from qconvert.scheme_catalog import CATALOG
    from qconvert.serving import FAMILIES, SERVES, output_kind, serving_for, variant_recipe

    rows = [{**row, "serves_in": {family: [e.to_json() for e in serving_for(output_kind(row["name"]), family)]
                                  for family in FAMILIES}} for row in CATALOG]
    names = {row["name"] for row in CATALOG}
    extra = {kind: [e.to_json() for e in entries] for kind, entries in SERVES.items() if kind not in names}
    variants = [{"name": kind, "made_by": variant_recipe(kind),
                 "serves_in": {family: [e.to_json() for e in serving_for(kind, family)] for family in FAMILIES}}
                for kind in extra]
    if as_json:
        _emit_json({"schemes": rows, "other_outputs": extra, "variants": variants})
        return
    table = Table(title="schemes (qconvert quantize -s NAME)", title_justify="left")
    for column in ("scheme", "weights", "format", "what it writes", "loads in (other families where they differ)"):
        table.add_column(column)
    for row in rows:
        table.add_row(escape(row["name"]), escape(row["label"]), escape(row["format"]), escape(row["summary"]),
                      escape(_serving_text(row["serves_in"])))
    out.print(table, soft_wrap=False)  # soft wrap would keep every cell on one line
    table = Table(title="output variants (not schemes: made by other flags)", title_justify="left")
    for column in ("variant", "made by", "loads in (other families where they differ)"):
        table.add_column(column)
    for variant in variants:
        table.add_row(escape(variant["name"]), escape(variant["made_by"]),
                      escape(_serving_text(variant["serves_in"])))
    out.print(table, soft_wrap=False)  # soft wrap would keep every cell on one line


def _serving_text(by_family: dict[str, list[dict]]) -> str:
    def line(entries: list[dict]) -> str:
        by_engine: dict[str, list[str]] = {}
        for e in entries:
            where = f" sm{e['min_capability']}+" if e["min_capability"] else ""
            by_engine.setdefault(f"{e['engine']} {e['version']}".strip(), []).append(
                e["method"].removeprefix("CompressedTensors") + where)
        return "; ".join(f"{engine}: {', '.join(methods)}" for engine, methods in by_engine.items()) or "-"

    llama = line(by_family["llama"])
    labels = {"deepseek": "DeepSeek", "gpt_oss": "gpt-oss", "granitemoe": "GraniteMoE"}
    others = [f"{labels.get(family, family)}: {text}" for family, entries in by_family.items()
              if family != "llama" and (text := line(entries)) != llama]
    return "\n".join([llama, *others])


def _version(value: bool) -> None:
    if value:
        print(f"qconvert {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    pass


def interrupt_outcome() -> str:
    """What an interrupt left on disk. Read from :mod:`qconvert.writing` only if a command loaded it (it
    imports torch): a command that never did cannot have written anything."""
    writing = sys.modules.get("qconvert.writing")
    return writing.interrupt_outcome() if writing is not None else "no output was left behind"


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn every failure into one line and a documented exit code."""
    args = sys.argv[1:] if argv is None else argv
    if qconvert.AS_COMMAND:
        gc.freeze()  # what the imports made lives as long as the process: never scan it again
        gc.enable()  # paused while importing (qconvert._command_starting)
    try:
        _main(args)
    except SystemExit as done:
        if qconvert.AS_COMMAND and argv is None:
            _leave(done.code if isinstance(done.code, int) else 0)
        raise
    finally:
        for signum, handler in _saved_handlers.items():
            signal.signal(signum, handler)
        _saved_handlers.clear()


def _leave(code: int) -> NoReturn:
    """End the ``qconvert`` process once its work is done, committed and reported.

    An ordinary exit then tears down the interpreter's state, torch's hundreds of thousands of objects,
    which takes 0.5-0.9 s: a tenth of a GPU conversion, for nothing. So flush the output streams, run
    the atexit handlers (Ray's, say) and leave without it, as mypy does. If a thread other than a daemon
    is still running (none should be), the ordinary exit waits for it instead.
    """
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    _flush()
    atexit._run_exitfuncs()
    _flush()
    os._exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that went away (`| head`), a closed stream
            stream.flush()


_saved_handlers: dict[int, object] = {}


def _main(args: list[str]) -> None:
    debug = "--debug" in args or os.environ.get("QCONVERT_DEBUG") == "1"
    internal = EXIT_INTERNAL if next((a for a in args if not a.startswith("-")), None) == "verify" else EXIT_FAILURE
    # SIGTERM (a CI job cancelled) and SIGHUP (the ssh session closed) unwind like Ctrl-C, so the
    # temporary output is removed; restored on return, for callers that run main() in-process.
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            _saved_handlers.setdefault(signum, signal.signal(signum, _raise_interrupt))
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="qconvert", standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except UsageError as exc:
        message = exc.format_message()
        if message:  # empty when the help text was shown instead (no arguments at all)
            err.print(one_line(f"error: {message}"), markup=False)
        code = EXIT_BAD_INPUT
    except QConvertError as exc:
        if debug:
            raise
        err.print(one_line(f"error: {exc}"), markup=False)
        code = exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        if debug:
            raise
        err.print(one_line(f"error: interrupted; {interrupt_outcome()}"), markup=False)
        code = EXIT_FAILURE
    except RecursionError:
        if debug:
            raise
        err.print("error: input nested too deeply to process (rerun with --debug for details)", markup=False)
        code = internal
    except Exception as exc:
        if debug:
            raise
        message = str(exc).splitlines()[0] if str(exc) else ""
        err.print(one_line(f"error: unexpected {type(exc).__name__}: {message} (rerun with --debug for details)"),
                  markup=False)
        code = internal
    if code == 130:  # Typer turns KeyboardInterrupt (so SIGTERM too) into exit code 130
        err.print(one_line(f"error: interrupted; {interrupt_outcome()}"), markup=False)
        code = EXIT_FAILURE
    sys.exit(code if isinstance(code, int) else 0)


@app.command()
def batch(
    jobs_file: Annotated[Path, typer.Argument(help="The job file (YAML): defaults and jobs.")],
    report: Annotated[
        Path | None, typer.Option("--report", help="Write the report (JSON Lines, one line per output) here.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report's JSON lines on stdout.")] = False,
    ray: Annotated[
        str | None, typer.Option("--ray", help="Run the jobs as Ray tasks: a cluster address, 'auto' "
                                 "(RAY_ADDRESS) or 'local' (start one on this machine).")
    ] = None,
    jobs: Annotated[
        int | None, typer.Option("--jobs", "-j", min=1, help="Jobs run at once (default 1; with --ray, all).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check and plan every output; write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Rebuild outputs that are up to date.")] = False,
    fail_fast: Annotated[
        bool, typer.Option("--fail-fast", help="Start no job after one has failed.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no error lines.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Run the conversions of a job file: several schemes from one read, up-to-date outputs skipped.

    Exit 0 when nothing failed, 2 when every failure was bad input, 1 otherwise.
    """
    import time

    from tqdm import tqdm

    from qconvert.batch import Report, Settings, load_jobs, run_local, summary_line
    from qconvert.batch import exit_code as batch_exit_code

    started = time.perf_counter()
    job_list = load_jobs(jobs_file, quantize_option_specs(), check_device=ray is None, dry_run=dry_run,
                         report=report)
    settings = Settings(force=force, dry_run=dry_run, fail_fast=fail_fast)
    total = sum(len(job.outputs) for job in job_list)
    terminal = sys.stderr.isatty() and not quiet
    rows: list[dict] = []
    # an output like any other: written beside its place and renamed there at the end (qconvert.batch.Report)
    sink = Report(report) if report is not None else None
    bar = tqdm(total=total, unit="output", desc="batch", disable=not terminal, dynamic_ncols=True, leave=False)

    def emit(line: dict) -> None:
        text = json.dumps(line)
        if sink is not None:
            sink.write(text)
        if as_json:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def on_rows(new: list[dict]) -> None:
        for line in new:
            rows.append(line)
            emit(line)
            bar.update()
            what = f"{line['status']:<7} {line['output']}"
            if line["status"] == "failed" and not quiet:
                tqdm.write(one_line(f"error: {line['model']} {line['scheme']}: {line['error']}"), file=sys.stderr)
            elif terminal:
                detail = line.get("reason") or (f"{line['seconds']:.1f} s, {_human_bytes(line['bytes_in'])} -> "
                                                f"{_human_bytes(line['bytes_out'])}")
                tqdm.write(one_line(f"{what}  ({detail})"), file=sys.stderr)

    try:
        if ray is not None:
            from qconvert.ray_runner import run_on_ray

            run_on_ray(job_list, settings, ray, jobs, on_rows)
        else:
            run_local(job_list, settings, jobs or 1, on_rows)
        summary = summary_line(rows, len(job_list), time.perf_counter() - started, dry_run)
        emit(summary)
        if sink is not None:
            sink.commit()
    finally:
        bar.close()
        if sink is not None:
            sink.abandon()
    counts = summary["summary"]
    if not as_json:
        out.print(f"batch: {counts['outputs']} outputs: {counts['ok']} ok, {counts['skipped']} skipped, "
                  f"{counts['failed']} failed{' (dry run)' if dry_run else ''}, {counts['seconds']:.1f} s",
                  markup=False)
    code = batch_exit_code(rows)
    if code:
        raise typer.Exit(code)


def quantize_option_specs() -> dict:
    """The options of ``qconvert quantize``, read from the command itself: a job file's keys (``batch``)."""
    from qconvert.batch import option_specs

    return option_specs(typer.main.get_command(app).commands["quantize"])  # type: ignore[attr-defined]
