"""TOFU-schema sources: a local directory of split files or a Hugging Face hub dataset (locuslab/TOFU)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from orchestrator.data.embedded import FORGET_PERCENTS
from orchestrator.data.files import read_rows
from orchestrator.data.validation import validate_split, validate_text_split
from orchestrator.errors import DataError, MissingSplit, first_line

# Our split names → TOFU's hub configs (the *_perturbed configs carry paraphrases and wrong answers).
TOFU_CONFIGS = {
    **{f"forget{p:02d}": f"forget{p:02d}_perturbed" for p in FORGET_PERCENTS},
    **{f"retain{100 - p}": f"retain{100 - p}" for p in FORGET_PERCENTS},
    **{f"holdout{p:02d}": f"holdout{p:02d}" for p in FORGET_PERCENTS},
    "real_authors": "real_authors_perturbed",
    "world_facts": "world_facts_perturbed",
    "retain_perturbed": "retain_perturbed",
    "full": "full",
}
DEFAULT_HUB_SPLITS = ("forget10", "retain90", "holdout10", "retain_perturbed", "real_authors", "world_facts")
# A local directory may lack TOFU's retain_perturbed (the retain metrics then score the retain split's rows)
# and its full split (validation then takes forget + retain as the whole data).
OPTIONAL_LOCAL_SPLITS = ("retain_perturbed", "full")
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet")


def file_stems(split: str) -> tuple[str, ...]:
    """File names a split may have in a local directory, first found wins: TOFU's published one (the hub
    config, ``forget10`` → ``forget10_perturbed``, which carries the paraphrased and wrong answers), then
    the split's own name (``forget10.json``, the renamed layout)."""
    return tuple(dict.fromkeys((TOFU_CONFIGS.get(split, split), split)))


def load_directory(directory: str | Path, splits: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """Splits from ``<name>.json`` (a list or JSON Lines), ``.jsonl`` or ``.parquet`` files in ``directory``,
    validated. ``splits``: ours, each found under ``file_stems``; None: every file, under its own stem."""
    directory = Path(directory)
    files: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix not in _FILE_SUFFIXES or not path.is_file():
            continue
        if path.stem in files:
            raise DataError(f"{path}: split '{path.stem}' also given by {files[path.stem].name}")
        files[path.stem] = path
    if not files:
        raise DataError(f"{directory}: no .json, .jsonl or .parquet split files")
    if splits is None:
        return {name: read_split_file(path) for name, path in files.items()}
    found = {}
    for split in splits:
        stem = next((stem for stem in file_stems(split) if stem in files), None)
        if stem is not None:
            found[split] = read_split_file(files[stem])
        elif split not in OPTIONAL_LOCAL_SPLITS:
            tried = " or ".join(f"{stem}{{{','.join(_FILE_SUFFIXES)}}}" for stem in file_stems(split))
            raise MissingSplit(f"{directory}: split '{split}' not found (looked for {tried})", split)
    return found


def read_split_file(path: Path) -> list[dict]:
    """Rows of one split file, validated; text corpus splits (``text_*``) need a ``text`` field."""
    rows, numbers = read_rows(path)
    if path.stem.startswith("text_"):
        validate_text_split(rows, str(path), numbers)
    else:
        validate_split(rows, str(path), require_perturbed=False, row_numbers=numbers)
    return rows


def load_hub(name: str, splits: Sequence[str]) -> dict[str, list[dict]]:
    """Splits of a Hugging Face dataset (TOFU's config names mapped onto ours); needs network or a cache."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise DataError(f"{name}: loading a hub dataset needs the 'datasets' package ({err})") from None
    benchmark = {}
    for split in splits:
        config = TOFU_CONFIGS.get(split, split)
        try:
            rows = datasets.load_dataset(name, config, split="train").to_list()
        except Exception as err:  # the hub client raises many types (connection, not found, offline)
            raise DataError(f"{name}: cannot load config '{config}' (split '{split}') from the Hugging Face hub: "
                            f"{type(err).__name__}: {first_line(err)}") from None
        validate_split(rows, f"{name}/{config}", require_perturbed=False)
        benchmark[split] = rows
    return benchmark
