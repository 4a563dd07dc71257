"""The errors bad input raises: each a one-line message naming the field (and file and line for data).

The CLI turns any ``BadInput`` into that line on stderr and exit status 2. Torch-free, so validation can
raise them before anything heavy is imported.
"""
from __future__ import annotations


class BadInput(ValueError):
    """Input the user can fix: the message is one line naming what to change."""


class SpecError(BadInput):
    """A one-line error about the job spec, naming the field."""


class DataError(BadInput):
    """Malformed or missing benchmark data; the message names file, row and field."""


class MissingSplit(DataError):
    """A split the run needs is not in the data; ``split`` names it, so the caller can name the field."""

    def __init__(self, message: str, split: str) -> None:
        super().__init__(message)
        self.split = split


class ModelLoadError(BadInput):
    """A model or tokenizer that cannot be found or loaded, named in one line."""


class SweepError(BadInput):
    """A search space that cannot be swept as asked (one line naming the field)."""


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (libraries raise multi-line ones)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
