"""Summarise the conformance tier's own results (``build/engines/<engine>.json``) as a markdown table.

``python tests/engines/summarize.py [RESULTS_DIR] [--readme docs/ci-and-testing.md]`` prints the table, or writes
it into that page between ``<!-- conformance-results -->`` markers, so the documented summary is the tests' data.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

MARKERS = ("<!-- conformance-results -->\n", "<!-- /conformance-results -->")


def load(results: Path) -> list[dict]:
    records: list[dict] = []
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
        records.extend(data if isinstance(data, list) else data.get("results", []))
    return records


def _not_written(record: dict) -> bool:
    """The case's output was refused by qconvert itself (both harnesses record that as the only problem)."""
    problems = record.get("problems") or []
    return not record["loaded"] and len(problems) == 1 and problems[0].startswith("qconvert refuse")


def table(records: list[dict]) -> str:
    rows: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for record in records:
        rows[(f"{record['engine']} {record['version']}", record["kind"], record["family"])].append(record)
    lines = ["| engine | output | family | loads at | refused at | picks (at the highest capability) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (engine, kind, family), cases in sorted(rows.items()):
        loaded = sorted({c["capability"] for c in cases if c["loaded"]})
        refused = sorted({c["capability"] for c in cases if not c["loaded"]})
        if all(_not_written(c) for c in cases):  # no engine ran: qconvert refuses to write this output
            lines.append(f"| {engine} | `{kind}` | {family} | – | not written by qconvert | – |")
            continue
        best = max(cases, key=lambda c: (c["loaded"], c["capability"]))
        # The distinct methods picked (linear layers, then MoE experts), short names: the full per-layer picks
        # are in the JSON.
        methods = best.get("picks") or {}
        linear = sorted({n.removeprefix("CompressedTensors") for k, n in methods.items() if k != "experts"})
        experts = methods.get("experts", "").removeprefix("CompressedTensors")
        picks = ", ".join(linear) + (f"; experts: {experts}" if experts else "") if methods else "–"
        lines.append(f"| {engine} | `{kind}` | {family} | {', '.join(f'sm{c}' for c in loaded) or '–'} | "
                     f"{', '.join(f'sm{c}' for c in refused) or '–'} | {picks} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    readme = None
    if "--readme" in argv:
        at = argv.index("--readme")
        readme, argv = Path(argv[at + 1]), argv[:at] + argv[at + 2:]
    results = Path(argv[0]) if argv else Path("build/engines")
    text = table(load(results))
    if readme is not None:
        head, _, rest = readme.read_text().partition(MARKERS[0])
        _, _, tail = rest.partition(MARKERS[1])
        readme.write_text(f"{head}{MARKERS[0]}{text}{MARKERS[1]}{tail}")
    else:
        print(text, end="")


if __name__ == "__main__":
    main(sys.argv[1:])
