"""Coverage per architecture: the share of linear parameters each scheme quantizes, as a markdown table.

Two figures per architecture, both from qconvert's own planner on the architecture matrix of
tests/arch_matrix.py:
- *tiny*: the test's tiny random checkpoint (hidden 128, 2 layers), planned as the test plans it;
- *full size*: the same planner on the tensor names and shapes of the model built from its
  transformers config at the config's default (released-model) dimensions, on the meta device, so
  no memory is used. Experts that transformers fuses in memory but stores per expert on disk
  (Qwen3-MoE, Mixtral, DeepSeek-V3) are split back into the per-expert names a checkpoint has.

Usage: ``PYTHONPATH=. python3 benchmarks/arch_coverage.py [--scheme rtn4] [--also fp8]``
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qconvert.checkpoint import Checkpoint
from qconvert.errors import BadInputError
from qconvert.planning import make_plan
from qconvert.safetensors_io import TensorInfo
from qconvert.schemes import get_scheme
from tests.arch_matrix import CASES, ArchCase

KINDS = ("attention", "mlp", "experts", "vision", "other")


def _disk_names(name: str, shape: tuple[int, ...], model_type: str) -> list[tuple[str, tuple[int, ...]]]:
    """In-memory fused experts → the per-expert tensors a checkpoint of that model holds."""
    per_expert = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "deepseek_v3": ("gate_proj", "up_proj",
                  "down_proj"), "mixtral": ("w1", "w3", "w2")}.get(model_type)
    if per_expert is None or len(shape) != 3 or ".experts." not in name:
        return [(name, shape)]
    base, _, leaf = name.rpartition(".")
    if model_type == "mixtral":
        base = base.replace(".mlp.", ".block_sparse_moe.")
    experts = shape[0]
    if leaf == "gate_up_proj":
        half = (shape[1] // 2, shape[2])
        return [(f"{base}.{e}.{part}.weight", half) for e in range(experts) for part in per_expert[:2]]
    return [(f"{base}.{e}.{per_expert[2]}.weight", shape[1:]) for e in range(experts)]


def full_size_checkpoint(case: ArchCase) -> Checkpoint:
    import transformers

    config = transformers.AutoConfig.for_model(case.model_type)
    with torch.device("meta"):
        model = getattr(transformers, case.auto).from_config(config)
    tensors = {}
    for name, param in model.state_dict().items():
        for disk_name, shape in _disk_names(name, tuple(param.shape), case.model_type):
            tensors[disk_name] = TensorInfo(disk_name, torch.bfloat16, tuple(shape), Path("meta"), 0,
                                            2 * int(torch.tensor(shape).prod()))
    if case.model_type == "granitemoe":  # its checkpoints keep the legacy names
        tensors = {n.replace("experts.gate_up_proj", "input_linear.weight")
                   .replace("experts.down_proj", "output_linear.weight")
                   .replace("router.weight", "router.layer.weight"): t for n, t in tensors.items()}
    return Checkpoint(Path(f"<{case.model_type} default config>"), [], tensors, config.to_dict())


def tiny_checkpoint(case: ArchCase, root: Path) -> Checkpoint:
    from qconvert.checkpoint import open_checkpoint
    from tests.test_architectures import build_checkpoint

    return open_checkpoint(build_checkpoint(case, root))


def coverage(checkpoint: Checkpoint, case: ArchCase, scheme: str, group_size: int | None = None) -> dict | str:
    try:
        plan = make_plan(checkpoint, get_scheme(scheme, group_size),
                         keep_experts=case.request.get("keep_fused_experts", False))
    except BadInputError as exc:
        # "no tensor to quantize: every linear weight is left unquantized: 48 x <reason>: ..."
        return str(exc).split("unquantized: ", 1)[-1].split(":")[0]
    return plan.coverage


def _cell(cov: dict | str, kind: str | None = None) -> str:
    if isinstance(cov, str):
        return "0.0%" if kind is None else "–"
    entry = cov if kind is None else cov["by_kind"].get(kind)
    if not entry or entry["share"] is None:
        return ""
    return f"{100 * entry['share']:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", default="rtn4")
    parser.add_argument("--also", default="fp8", help="a second scheme, full size overall only")
    parser.add_argument("--group-size", type=int, default=None, help="of --scheme (as quantize --group-size)")
    args = parser.parse_args()
    print(f"| architecture | {args.scheme}, tiny test model | {args.scheme}, full size | {args.also}, full size | "
          + " | ".join(f"{k}" for k in KINDS) + f" | left unquantized ({args.scheme}, full size) |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in KINDS) + " | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            tiny = coverage(tiny_checkpoint(case, Path(tmp)), case, args.scheme, args.group_size)
            full_checkpoint = full_size_checkpoint(case)
            full = coverage(full_checkpoint, case, args.scheme, args.group_size)
            also = coverage(full_checkpoint, case, args.also)
            why = full if isinstance(full, str) else "; ".join(_left_out(full_checkpoint, case, args.scheme))
            print(f"| {case.name} | {_cell(tiny)} | {_cell(full)} | {_cell(also)} | "
                  + " | ".join(_cell(full, k) for k in KINDS) + f" | {why} |")


def _left_out(checkpoint: Checkpoint, case: ArchCase, scheme: str) -> list[str]:
    """Why linear weights are left unquantized, by reason (its first words)."""
    plan = make_plan(checkpoint, get_scheme(scheme), keep_experts=case.request.get("keep_fused_experts", False))
    reasons = {re.sub(r"\d{2,}", "N", s.reason.split(":")[0].split(" (")[0])
               for s in plan.skipped if s.kind is not None}
    return sorted(reasons)


if __name__ == "__main__":
    main()
