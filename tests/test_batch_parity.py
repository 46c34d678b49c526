"""``qconvert batch`` writes byte for byte what ``qconvert quantize`` writes, for every scheme on every architecture
of tests/arch_matrix.py (``make arch``), and on tiny Llama and DeepSeek (fp8-tensor, whose MLA scales are shared
by the architecture's own fusion map) in the fast tier.

Each architecture runs as one batch job of all its schemes (one read, fanned out), then each scheme alone
(written by quantize's own writer, as ``resume: true`` makes batch do) and as ``qconvert quantize``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.arch_matrix import ALL_SCHEMES, CASES, ArchCase
from tests.test_batch import output_digest, qconvert

transformers = pytest.importorskip("transformers")


def assert_parity(capsys: pytest.CaptureFixture, source: Path, schemes: tuple[str, ...], root: Path,
                  options: dict[str, bool] | None = None, alone: tuple[str, ...] = ()) -> dict[str, Path]:
    """Batch (all ``schemes`` from one read; those in ``alone`` also as single-output jobs with ``resume``) against
    quantize, every file byte for byte; returns quantize's outputs by scheme."""
    options = options or {}
    keys = "".join(f"    {key}: {'true' if value else 'false'}\n" for key, value in options.items())
    root.mkdir(parents=True, exist_ok=True)
    jobs = root / "jobs.yaml"
    text = f"jobs:\n  - model: {source}\n    schemes: [{', '.join(schemes)}]\n    output: {root}/fan/{{scheme}}\n{keys}"
    for scheme in alone:
        text += (f"  - model: {source}\n    scheme: {scheme}\n    resume: true\n"
                 f"    output: {root}/alone/{scheme}\n{keys}")
    jobs.write_text(text)
    result = qconvert(capsys, "batch", jobs, "--quiet")
    assert result.code == 0, result.stderr + result.stdout
    flags = [f"--{key.replace('_', '-')}" for key, value in options.items() if value]
    singles = {}
    for scheme in schemes:
        single = root / "single" / scheme
        done = qconvert(capsys, "quantize", source, "-s", scheme, "-o", single, "-q", *flags)
        assert done.code == 0, done.stderr
        assert output_digest(root / "fan" / scheme) == output_digest(single), scheme
        if scheme in alone:
            assert output_digest(root / "alone" / scheme) == output_digest(single), scheme
        singles[scheme] = single
    return singles


@pytest.fixture(scope="module")
def arch_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("parity-arch")


def _build(case: ArchCase, root: Path) -> Path:
    from tests.test_architectures import build_checkpoint

    return build_checkpoint(case, root)


def _scales(folder: Path) -> dict[str, float]:
    found = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            found.update({k.removesuffix(".weight_scale"): f.get_tensor(k).item()
                          for k in f.keys() if k.endswith(".weight_scale")})
    return found


def test_parity_tiny_llama_and_deepseek_fp8_tensor(tiny_llama: Path, arch_root: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    assert_parity(capsys, tiny_llama, ("rtn4", "fp8-tensor", "nvfp4"), tmp_path / "llama", alone=("fp8-tensor",))
    deepseek = _build(next(c for c in CASES if c.name == "deepseek_v3"), arch_root)
    singles = assert_parity(capsys, deepseek, ("fp8-tensor", "rtn4"), tmp_path / "deepseek", alone=("fp8-tensor",))
    # what made batch differ: the architecture's fusion map (MLA's fused_qkv_a_proj shares one scale), not the
    # common q/k/v + gate/up patterns
    scales = _scales(singles["fp8-tensor"])
    attn = "model.layers.0.self_attn"
    assert scales[f"{attn}.q_a_proj"] == scales[f"{attn}.kv_a_proj_with_mqa"] != scales[f"{attn}.q_b_proj"]


@pytest.mark.arch
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_parity_every_architecture_every_scheme(case: ArchCase, arch_root: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    source = _build(case, arch_root)
    options = {key: bool(value) for key, value in case.request.items()}
    if not case.schemes:  # GPT-2: nothing its loaders quantize; quantize refuses it, and batch with the same line
        jobs = tmp_path / "jobs.yaml"
        jobs.write_text(f"jobs:\n  - model: {source}\n    schemes: [{', '.join(ALL_SCHEMES)}]\n"
                        f"    output: {tmp_path}/{{scheme}}\n")
        rows = [json.loads(line) for line in qconvert(capsys, "batch", jobs, "--json").stdout.splitlines()[:-1]]
        for row in rows:
            single = qconvert(capsys, "quantize", source, "-s", row["scheme"], "-o", tmp_path / "single", "-q")
            assert (single.code, single.stderr_lines) == (row["exit_code"], [f"error: {row['error']}"])
        assert len(rows) == len(ALL_SCHEMES) and not list(tmp_path.glob("*/*.safetensors"))
        return
    assert_parity(capsys, source, case.schemes, tmp_path, options, alone=case.schemes[:1])
