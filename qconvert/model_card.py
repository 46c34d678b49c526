"""The model card (``README.md``) written into every quantized output, as quantized repositories on the Hub
carry one: the Hub's metadata block (``base_model``, tags with ``compressed-tensors`` and the scheme), what
the checkpoint holds, the command that writes it, and where it loads.

Made only from the output's own config and the input's folder (no time, no command line), so ``batch`` and
``quantize`` write the same bytes for the same output. The input's own card is kept below ours, under
"Original model card", without its metadata block (a card has one).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from qconvert import __version__
from qconvert.naming import model_name

CARD_NAME = "README.md"
_KEPT_METADATA = ("license", "language", "library_name", "pipeline_tag")  # the input's, still true of the output
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.DOTALL)


def _base_model(source: Path) -> str:
    """The input as the Hub names it where we can tell (a cache snapshot of ``org/name``), else its name."""
    for part in reversed(source.resolve().parts):
        if part.startswith("models--"):
            return _printable("/".join(part.split("--")[1:]))
    return _printable(model_name(str(source)))


def _printable(name: str) -> str:
    """A folder name as UTF-8 text: bytes that are not UTF-8 (legal in Linux names) become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _schemes(qconfig: dict) -> list[str]:
    """The scheme names of the config's groups (as `qconvert schemes` lists them), else a description."""
    from qconvert.scheme_catalog import CATALOG

    names = []
    for group in (qconfig.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        fmt = group.get("format") or qconfig.get("format")
        match = next((row["name"] for row in CATALOG if row["format"] == fmt and row["bits"] == weights.get("num_bits")
                      and row["strategy"] == weights.get("strategy") and row["type"] == weights.get("type")
                      and row["group_size"] == weights.get("group_size")), None)
        names.append(match or f"{weights.get('type')}{weights.get('num_bits')} {weights.get('strategy')}")
    return sorted(set(names))


def _loads_in(kind: str, config: dict) -> str:
    from qconvert.serving import family_of, serving_for

    by_engine: dict[str, list[str]] = {}
    for entry in serving_for(kind, family_of(config)):
        where = f" from sm{entry.min_capability}" if entry.min_capability else ""
        by_engine.setdefault(f"{entry.engine.value} {entry.version}".strip(), []).append(
            f"{entry.method.removeprefix('CompressedTensors')}{where}")
    return "\n".join(f"- {engine}: {', '.join(methods)}" for engine, methods in by_engine.items()) or "- (none tested)"


def model_card(source: Path, config: dict, original: str | None) -> str | None:
    """The card's text for an output of ``config`` made from ``source``; None for an unquantized output."""
    qconfig = config.get("quantization_config")
    if not isinstance(qconfig, dict):
        return None
    base = _base_model(source)
    schemes = _schemes(qconfig) if qconfig.get("quant_method") == "compressed-tensors" else []
    if qconfig.get("quant_method") == "blockwise_int8":
        schemes, layout = ["int8-block"], " --layout sglang"
    else:
        layout = ""
    fnuz = " --fnuz" if qconfig.get("qconvert_fp8_format") == "e4m3fnuz" else ""
    old_meta: dict = {}
    body = original or ""
    match = _FRONT_MATTER.match(body)
    if match:
        try:
            loaded = yaml.safe_load(match.group(1))
            old_meta = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            old_meta = {}
        body = body[match.end():]
    old_tags = old_meta.get("tags") if isinstance(old_meta.get("tags"), list) else []
    tags = list(dict.fromkeys([*map(str, old_tags), "compressed-tensors", "qconvert", "quantized", *schemes]))
    meta = {"base_model": base, "tags": tags, **{k: old_meta[k] for k in _KEPT_METADATA if k in old_meta}}
    scheme_text = " + ".join(schemes) or str(qconfig.get("quant_method"))
    if len(schemes) == 1:
        command = f"qconvert quantize {base} --scheme {schemes[0]}{layout}{fnuz}"
        how = f"Written as this command writes it (qconvert {__version__}):\n\n```bash\n{command}\n```\n"
        kind = schemes[0] + ("@sglang" if layout else "") + ("+fnuz" if fnuz else "")
        where = f"\n## Where it loads\n\nTested by qconvert's conformance tier:\n\n{_loads_in(kind, config)}\n"
    else:
        how = (f"Written by qconvert {__version__} in mixed precision; `quantization_config` in `config.json` gives "
               "each layer's scheme (`qconvert inspect` shows them).\n")
        where = "\n## Where it loads\n\nWhere every one of its schemes loads: `qconvert schemes`.\n"
    card = (f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---\n\n"
            f"# {model_name(str(source))} ({scheme_text})\n\n"
            f"`{base}` quantized to {scheme_text} in the compressed-tensors format "
            f"(`{qconfig.get('format', qconfig.get('quant_method'))}`). {how}{where}")
    if body.strip():
        card += f"\n## Original model card\n\n{body.lstrip()}"
    return card


def write_model_card(folder: Path, source: Path, config: dict, copied: list[Path]) -> None:
    """Write the card into the output ``folder``. The input's own card goes below ours: the copy just made of it,
    when ``copied`` (the input's files copied into the output) holds one; a card already in the folder otherwise
    (a dead run's, adopted by ``--resume``) is not an input's and is replaced."""
    path = folder / CARD_NAME
    original = path.read_text(errors="replace") if Path(CARD_NAME) in copied and path.is_file() else None
    card = model_card(source, config, original)
    if card is not None:
        path.write_text(_printable(card))  # (a non-UTF-8 folder name reaches the card as surrogates)
    elif Path(CARD_NAME) not in copied:
        path.unlink(missing_ok=True)
