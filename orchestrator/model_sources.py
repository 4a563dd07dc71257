"""Model references in a spec: which exist, checked before Ray starts, without importing torch.

A reference is ``"embedded"`` (built by prepare), a local ``from_pretrained`` directory, or a hub id.
"""
from __future__ import annotations

import os
from pathlib import Path

from orchestrator.errors import ModelLoadError, first_line


def check_reference(reference: str, field: str) -> None:
    """Fail fast (before Ray starts) on a local path that does not exist or a hub id not reachable."""
    expanded = os.path.expanduser(reference)
    if reference.startswith((".", "/", "~")):
        if not Path(expanded).exists():
            raise ModelLoadError(f"field '{field}': model path {reference!r} does not exist")
        return
    if Path(expanded).exists():
        return
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(reference)
    except Exception as err:  # noqa: BLE001 - any failure to resolve is reported as one line
        reason = first_line(err)
        raise ModelLoadError(
            f"field '{field}': cannot load {reference!r} (no local path, and the hub is unreachable or has no such id): {reason[:160]}"
        ) from None
