"""Where this code is and what runs it: the project root, and the git SHA and library versions that every
evals row records."""
from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def provenance() -> dict[str, Any]:
    """Git SHA and library versions for every evals row, read from package metadata (nothing is imported;
    Ray is absent from the torchrun GPU check)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    versions = {"python": platform.python_version()}
    for package in ("torch", "deepspeed", "transformers", "ray"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {"git_sha": sha, "versions": json.dumps(versions, sort_keys=True)}
