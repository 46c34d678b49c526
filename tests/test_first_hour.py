"""A newcomer's first hour (issue 21): start-up without torch, inspect's rendering, claims that read right,
commands that neither do nothing silently nor pass when the run would fail, and defaults a user expects."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qconvert import serving
from tests.conftest import run_cli, run_python

# --- 4. start-up: the commands that need no model never import torch ------------------------------------------

STARTUP_COMMANDS = (["--version"], ["--help"], ["schemes"], ["quantize", "--help"], ["--no-such-option"],
                    ["quantize", "--no-such-option"])


def test_startup_commands_do_not_import_torch() -> None:
    """Each command runs through the real entry point in a fresh interpreter, which then reports whether torch
    was imported (the behaviour behind the 0.5 s target; benchmarks/startup.py gives the times)."""
    code = (
        f"import sys\nfrom qconvert.cli import main\nfor args in {STARTUP_COMMANDS!r}:\n"
        "    try:\n        main(list(args))\n    except SystemExit:\n        pass\n"
        "print('TORCH', 'torch' in sys.modules, file=sys.stderr)\n"
    )
    proc = run_python("-c", code)
    assert "TORCH False" in proc.stderr, proc.stderr[-2000:]
    assert "qconvert" in proc.stdout and "rtn4" in proc.stdout  # the commands did run


def test_scheme_catalog_matches_the_schemes() -> None:
    """`schemes` and `--help` read a torch-free copy of the scheme table: it must equal the real one."""
    from qconvert.scheme_catalog import CATALOG, build

    assert list(CATALOG) == build(), "run: python -m qconvert.scheme_catalog"


def test_scheme_help_lists_the_schemes() -> None:
    result = run_cli("quantize", "--help", env={"COLUMNS": "200"})
    assert result.code == 0
    line = next(line for line in result.stdout.splitlines() if "--scheme" in line)
    assert "rtn4" in line and "fp8-block" in line and "nvfp4" in line, line


# --- 5. claims: serves_in per method, notes, schemes vs variants -----------------------------------------------

def test_serves_in_lists_each_method_with_its_capability(tiny_llama: Path, tmp_path: Path) -> None:
    """fp8-block: vLLM serves W8A16 from sm75 and W8A8 from sm89, as the table prints; not one sm89 entry."""
    result = run_cli("quantize", tiny_llama, "-s", "fp8-block", "-o", tmp_path / "o", "--dry-run", "--json")
    assert result.code == 0, result.stderr
    vllm = [(e["method"], e["min_capability"]) for e in json.loads(result.stdout)["serves_in"]
            if e["engine"] == "vllm"]
    assert vllm == [("CompressedTensorsW8A16Fp8", 75), ("CompressedTensorsW8A8Fp8", 89)]
    assert vllm == [(s.method, s.min_capability) for s in serving.serving_for("fp8-block") if s.engine.value == "vllm"]


def test_int8_block_note_names_no_wrong_family(minilm_dir: Path, tmp_path: Path) -> None:
    result = run_cli("quantize", minilm_dir, "-s", "int8-block", "-o", tmp_path / "o", "--dry-run")
    assert result.code == 0, result.stderr
    (note,) = [line for line in result.stderr.splitlines() if "neither vLLM" in line]
    assert "llama" not in note.lower() and "  " not in note, note


def test_schemes_separates_variants_from_schemes() -> None:
    result = run_cli("schemes", "--json")
    data = json.loads(result.stdout)
    names = {row["name"] for row in data["schemes"]}
    variants = {row["name"]: row["made_by"] for row in data["variants"]}
    assert "fp8+fnuz" not in names and "int8-block@sglang" not in names
    assert "--fnuz" in variants["fp8+fnuz"] and "--layout sglang" in variants["int8-block@sglang"]
    text = run_cli("schemes", env={"COLUMNS": "200"}).stdout
    scheme_part, _, variant_part = text.partition("output variants")
    assert "fp8+fnuz" not in scheme_part and "fp8+fnuz" in variant_part


@pytest.mark.parametrize(("variant", "flags"), [("fp8+fnuz", "-s fp8 --fnuz"),
                                                 ("int8-block@sglang", "-s int8-block --layout sglang"),
                                                 ("fp8-tensor+shared-scale", "--op shared-scale")])
def test_scheme_option_given_a_variant_names_its_flags(tiny_llama: Path, tmp_path: Path, variant: str,
                                                        flags: str) -> None:
    result = run_cli("quantize", tiny_llama, "-s", variant, "-o", tmp_path / "o")
    assert result.code == 2
    (line,) = result.stderr_lines
    assert "output variant" in line and flags in line, line


# --- 3. inspect: the format in the title, whole layer names at 80 columns, one row order -----------------------

@pytest.fixture
def narrow_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's console as an 80-column terminal's."""
    from rich.console import Console

    from qconvert import cli

    monkeypatch.setattr(cli, "out", Console(highlight=False, soft_wrap=True, width=80))


def _table_lines(text: str) -> list[str]:
    """The table's rows that start a layer (a row's continuation lines, of wrapped cells, have no name)."""
    return [line for line in text.splitlines() if "│" in line and line.split("│")[0].strip()]


def test_inspect_shows_the_format_and_whole_names_at_80_columns(tiny_llama: Path, tmp_path: Path,
                                                                 narrow_terminal: None) -> None:
    assert run_cli("quantize", tiny_llama, "-s", "rtn4", "-o", tmp_path / "o", "-q").code == 0
    result = run_cli("inspect", tmp_path / "o")
    assert result.code == 0, result.stderr
    assert "[compressed-tensors pack-quantized]" in result.stdout  # the title (wrapped at 80 with a long path)
    lines = result.stdout.splitlines()[:-1]  # the totals line is one soft-wrapped line
    assert max(len(line.rstrip()) for line in lines) <= 80
    first_cells = [line.split("│")[0].strip() for line in _table_lines(result.stdout)]
    modules = [layer["module"] for layer in json.loads(run_cli("inspect", tmp_path / "o", "--json").stdout)["layers"]]
    assert sorted(first_cells) == sorted(modules)  # each name whole on its line, none cut to "model.layers.0.mlp…"


def test_inspect_escapes_markup_in_names(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"model.[bold]x[/bold].weight": torch.zeros(4, 4, dtype=torch.bfloat16)},
              str(tmp_path / "model.safetensors"))
    result = run_cli("inspect", tmp_path / "model.safetensors")
    assert result.code == 0 and "model.[bold]x[/bold]" in result.stdout, result.stdout


def test_inspect_rows_in_one_order_whatever_the_scheme(tiny_llama: Path, tmp_path: Path) -> None:
    orders = []
    for scheme in ("rtn4", "fp8", "nvfp4"):
        assert run_cli("quantize", tiny_llama, "-s", scheme, "-o", tmp_path / scheme, "-q").code == 0
        text = run_cli("inspect", tmp_path / scheme).stdout
        orders.append([line.split("│")[0].strip() for line in _table_lines(text)])
    assert orders[0] == orders[1] == orders[2]
    assert orders[0].index("model.layers.0.mlp.down_proj") < orders[0].index("model.layers.1.mlp.down_proj")


def test_inspect_json_unchanged(tiny_llama: Path, tmp_path: Path) -> None:
    """--json is the report as inspect_path builds it (order and keys), untouched by the table's sorting."""
    from qconvert.inspection import inspect_path

    assert run_cli("quantize", tiny_llama, "-s", "fp8", "-o", tmp_path / "o", "-q").code == 0
    assert json.loads(run_cli("inspect", tmp_path / "o", "--json").stdout) == inspect_path(str(tmp_path / "o"))


# --- 6. no-op conversions and dry runs that pass where the run would fail --------------------------------------

def test_shared_scale_on_an_already_shared_output_writes_nothing(tiny_llama: Path, tmp_path: Path) -> None:
    assert run_cli("quantize", tiny_llama, "-s", "fp8-tensor", "-o", tmp_path / "ft", "-q").code == 0
    result = run_cli("convert", tmp_path / "ft", "--op", "shared-scale", "-o", tmp_path / "ss")
    assert result.code == 0, result.stderr
    assert "nothing written" in result.stdout and "already share one scale" in result.stdout
    assert not (tmp_path / "ss").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ft"]
    data = json.loads(run_cli("convert", tmp_path / "ft", "--op", "shared-scale", "-o", tmp_path / "ss",
                              "--json").stdout)
    assert data["output"] is None and data["converted"] == [] and data["unchanged"]


def test_dry_run_fails_where_the_run_would(tiny_llama: Path, tmp_path: Path) -> None:
    """The output exists (no --overwrite): the run exits 2 before writing, and so must its dry run."""
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("work of a day")
    real = run_cli("quantize", tiny_llama, "-o", tmp_path / "o")
    dry = run_cli("quantize", tiny_llama, "-o", tmp_path / "o", "--dry-run")
    assert real.code == dry.code == 2
    assert real.stderr_lines[-1] == dry.stderr_lines[-1] and "--overwrite" in dry.stderr_lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no lock file left by the dry run
    assert run_cli("quantize", tiny_llama, "-o", tmp_path / "o", "--dry-run", "--overwrite").code == 0


def test_dry_run_refused_by_min_coverage_still_prints_its_plan(tiny_llama: Path, tmp_path: Path) -> None:
    result = run_cli("quantize", tiny_llama, "-o", tmp_path / "o", "--dry-run", "--min-coverage", "0.9",
                     "--ignore", "re:.*mlp.*", env={"COLUMNS": "200"})
    assert result.code == 2
    assert "below --min-coverage" in result.stderr_lines[-1]
    assert "model.layers.0.mlp.down_proj" in result.stdout and "unquantized" in result.stdout  # the plan
    as_json = run_cli("quantize", tiny_llama, "-o", tmp_path / "o", "--dry-run", "--min-coverage", "0.9",
                      "--ignore", "re:.*mlp.*", "--json")
    assert as_json.code == 2 and json.loads(as_json.stdout)["dry_run"] is True


# --- 7. defaults: where outputs go, {name}, verify on the CPU ---------------------------------------------------

def test_default_output_of_an_installed_model_is_in_the_working_folder(minilm_dir: Path, tmp_path: Path) -> None:
    """The demo's model lives in site-packages: its output goes to ./all-MiniLM-L6-v2-rtn4, not beside it."""
    assert "site-packages" in minilm_dir.parts or "dist-packages" in minilm_dir.parts
    result = run_cli("quantize", minilm_dir, "--dry-run", "--json", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["output"] == str(tmp_path / "all-MiniLM-L6-v2-rtn4")


def test_default_output_beside_a_users_own_folder(tiny_llama: Path, tmp_path: Path) -> None:
    import shutil

    model = Path(shutil.copytree(tiny_llama, tmp_path / "my-llama"))
    result = run_cli("quantize", model, "-s", "fp8", "--dry-run", "--json", cwd=tmp_path)
    assert json.loads(result.stdout)["output"] == str(tmp_path / "my-llama-fp8")


def test_default_output_from_a_hub_cache_snapshot(tiny_llama: Path, tmp_path: Path) -> None:
    import shutil

    snapshot = tmp_path / "hub" / "models--org--tiny-chat" / "snapshots" / ("ab" * 20)
    shutil.copytree(tiny_llama, snapshot)
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli("quantize", snapshot, "--dry-run", "--json", cwd=work)
    assert json.loads(result.stdout)["output"] == str(work / "tiny-chat-rtn4")


def test_batch_name_is_the_models_own_name(minilm_dir: Path, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(f"defaults:\n  output: \"{tmp_path}/{{name}}-{{scheme}}\"\njobs:\n  - model: {minilm_dir}\n"
                    "    scheme: rtn4\n")
    result = run_cli("batch", jobs, "--dry-run", "--json")
    assert result.code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if '"output"' in line]
    assert rows and rows[0]["output"] == str(tmp_path / "all-MiniLM-L6-v2-rtn4")


def test_verify_on_cpu_reports_progress_with_a_total_off_a_terminal(tiny_llama: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Not on a terminal: plain lines with the count, the total and the time left (every INTERVAL seconds, and
    the last); the CPU default token count keeps a tiny model's verify short."""
    from qconvert import cli

    assert run_cli("quantize", tiny_llama, "-s", "rtn4", "-o", tmp_path / "o", "-q").code == 0
    monkeypatch.setattr(cli._VerifyProgress, "INTERVAL", 0.0)  # a line per layer
    result = run_cli("verify", tmp_path / "o", "--device", "cpu", "--layers", r"layers\.0\.self_attn\.[qk]_proj")
    assert result.code == 0, result.stderr
    lines = [line for line in result.stderr_lines if line.startswith("verify: ")]
    assert [line.split(",")[0] for line in lines] == ["verify: 1/2 layers", "verify: 2/2 layers"]
    assert all("s left" in line for line in lines)
    assert re.search(r"tokens 1(?![,\d])", result.stdout), result.stdout  # the CPU default: M = 1 only


# --- 9. the CI example: a workflow that installs qconvert and runs batch on a job file -----------------------

def test_example_workflow_runs_its_job_file(minilm_dir: Path, tmp_path: Path) -> None:
    import shlex

    import yaml

    from tests.conftest import REPO

    workflow = yaml.safe_load((REPO / "examples" / "ci.yml").read_text())
    steps = workflow["jobs"]["quantize"]["steps"]
    script = "\n".join(step.get("run", "") for step in steps)
    assert "pip install ." in script  # installs this repository, not a placeholder URL
    (batch_line,) = [line for line in script.splitlines() if line.strip().startswith("qconvert batch")]
    args = shlex.split(batch_line)[1:]
    assert (REPO / args[1]).is_file()  # the job file it names exists
    # Its other steps, as they run in CI: the job file names the model through a link.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "all-MiniLM-L6-v2").symlink_to(minilm_dir)
    result = run_cli(*[str(REPO / a) if a == args[1] else a for a in args], cwd=tmp_path)
    assert result.code == 0, result.stderr
    lines = [json.loads(line) for line in (tmp_path / "build" / "report.jsonl").read_text().splitlines()]
    assert lines[-1]["summary"]["ok"] == 2
    assert sorted(p.name for p in (tmp_path / "build" / "quantized").iterdir()) == [
        "all-MiniLM-L6-v2-fp8", "all-MiniLM-L6-v2-rtn4"]


# --- 8. the README: short, self-contained, its tables made from the code --------------------------------------

def test_readme_is_short_and_names_nothing_outside_the_repository() -> None:
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = page.read_text()
        assert not re.search(r"\.\./shared|(?<![\w.])/(work|root|home|tmp|opt)/", text), page.name
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):  # relative links resolve, inside the clone
            resolved = (page.parent / target).resolve()
            assert resolved.exists() and resolved.is_relative_to(REPO.resolve()), f"{page.name}: {target}"


def test_readme_schemes_table_is_made_from_the_code() -> None:
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    assert serving.SCHEMES_MARKERS[0] in readme
    assert readme == serving.readme_with_table(readme), "run: python -m qconvert.serving README.md docs/schemes.md"


def test_reference_documents_every_option() -> None:
    """docs/reference.md restates the options: every option of every command must appear there."""
    import typer

    from qconvert.cli import app
    from tests.conftest import REPO

    reference = (REPO / "docs" / "reference.md").read_text()
    missing = [f"{name} {option}" for name, command in typer.main.get_command(app).commands.items()
               for param in command.params for option in param.opts
               if option.startswith("--") and not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", reference)]
    assert not missing, missing


# --- the model card written into every output ------------------------------------------------------------------

def test_every_output_carries_a_model_card(tiny_llama: Path, tmp_path: Path) -> None:
    import shutil

    import yaml

    model = Path(shutil.copytree(tiny_llama, tmp_path / "tiny-chat"))
    (model / "README.md").write_text("---\nlicense: mit\ntags: [chat]\n---\n# tiny-chat\nThe original text.\n")
    assert run_cli("quantize", model, "-s", "fp8-block", "-o", tmp_path / "q", "-q").code == 0
    card = (tmp_path / "q" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "tiny-chat" and meta["license"] == "mit"
    assert {"chat", "compressed-tensors", "fp8-block"} <= set(meta["tags"])
    assert "qconvert quantize tiny-chat --scheme fp8-block" in card
    assert "W8A16Fp8 from sm75" in card and "W8A8Fp8 from sm89" in card  # where it loads, per method
    assert card.count("---\n") == 2 and card.rstrip().endswith("The original text.")  # the original below ours
    assert (model / "README.md").read_text().startswith("---\nlicense: mit")  # the input untouched
    # batch writes the same card (its outputs are byte for byte quantize's), convert one too
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(f"jobs:\n  - model: {model}\n    scheme: fp8-block\n    output: {tmp_path / 'b'}\n")
    assert run_cli("batch", jobs, "-q").code == 0
    assert (tmp_path / "b" / "README.md").read_text() == card
    assert run_cli("convert", tmp_path / "q", "--op", "fnuz", "-o", tmp_path / "z", "-q").code == 0
    assert "--scheme fp8-block --fnuz" in (tmp_path / "z" / "README.md").read_text()


# --- 2. the llm-compressor parity tests never skip silently in CI ---------------------------------------------

def test_parity_without_llm_compressor_fails_under_require(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reference python that cannot import llmcompressor: a skip for a developer, a failure in CI."""
    from tests.conftest import run_llm_compressor

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'llmcompressor'\" >&2\nexit 77\n")
    fake.chmod(0o755)
    monkeypatch.setenv("QCONVERT_LLMC_PYTHON", str(fake))
    monkeypatch.delenv("QCONVERT_REQUIRE_LLMC", raising=False)
    with pytest.raises(pytest.skip.Exception, match="llmcompressor"):
        run_llm_compressor(tmp_path, {"W4A16": tmp_path / "out"})
    monkeypatch.setenv("QCONVERT_REQUIRE_LLMC", "1")
    with pytest.raises(pytest.fail.Exception, match="QCONVERT_REQUIRE_LLMC"):
        run_llm_compressor(tmp_path, {"W4A16": tmp_path / "out"})
