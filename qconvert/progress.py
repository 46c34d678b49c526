"""Progress over bytes and tensors, silent unless stderr is a terminal (or when asked to be)."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, total_bytes: int, total_tensors: int, enabled: bool = True, desc: str = "quantize"):
        self.total_tensors = total_tensors
        self.tensors = 0
        self._bar = tqdm(
            total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc=desc,
            disable=not (enabled and sys.stderr.isatty()), dynamic_ncols=True, leave=False,
        )

    def advance(self, nbytes: int, tensors: int = 1) -> None:
        self.tensors += tensors
        if tensors:
            self._bar.set_postfix_str(f"tensors {self.tensors}/{self.total_tensors}", refresh=False)
        self._bar.update(nbytes)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()
