"""TOFU-schema sources: a local directory of split files or a Hugging Face hub dataset (locuslab/TOFU)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from orchestrator.data.embedded import FORGET_PERCENTS
from orchestrator.data.files import read_json_list, read_jsonl, read_parquet
from orchestrator.data.validation import validate_split, validate_text_split
from orchestrator.errors import DataError, first_line

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
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet")


def load_directory(directory: str | Path, splits: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """Every ``<split>.json`` (a list), ``.jsonl`` or ``.parquet`` file in ``directory``, validated."""
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
    wanted = list(splits) if splits is not None else list(files)
    missing = [name for name in wanted if name not in files]
    if missing:
        raise DataError(f"{directory}: split '{missing[0]}' not found (files for: {', '.join(files)})")
    return {name: read_split_file(files[name]) for name in wanted}


def read_split_file(path: Path) -> list[dict]:
    """Rows of one split file, validated; text corpus splits (``text_*``) need a ``text`` field."""
    if path.suffix == ".parquet":
        rows, numbers = read_parquet(path), None
    elif path.suffix == ".jsonl":
        rows, numbers = read_jsonl(path)
    else:
        rows, numbers = read_json_list(path), None
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
