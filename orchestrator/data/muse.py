"""MUSE sources: raw-text corpora plus knowledge QA, from a local directory or the hub (muse-bench/MUSE-*)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from orchestrator.data.files import read_rows, read_txt_documents
from orchestrator.data.validation import check_string, validate_split, validate_text_split
from orchestrator.errors import DataError, first_line

# Split names the evaluation reads: text rows {"text"} and question rows {"question", "answer"}.
MUSE_SPLITS = ("text_forget", "text_retain", "text_holdout", "knowmem_forget", "knowmem_retain")
# MUSE's VerbMem set: {"prompt", "gt"} rows, a long forget-text prefix and its true 128-token continuation.
VERBMEM_SPLIT = "verbmem_forget"
# MUSE's solved KnowMem examples, put in front of every question of the split they name (in-context learning).
KNOWMEM_EXAMPLE_SPLITS = {"knowmem_forget": "knowmem_forget_icl", "knowmem_retain": "knowmem_retain_icl"}
MUSE_OPTIONAL_SPLITS = (VERBMEM_SPLIT, *KNOWMEM_EXAMPLE_SPLITS.values())
_MUSE_TEXT_SPLITS = ("text_forget", "text_retain", "text_holdout")
# Our split → (hub config, hub split) of muse-bench/MUSE-News and MUSE-Books. ``raw/retain1`` is the set
# MUSE's methods regularise on; ``raw/retain2`` is kept back for its evaluation (``knowmem/retain_qa``).
MUSE_HUB_SPLITS = {
    "text_forget": ("raw", "forget"),
    "text_retain": ("raw", "retain1"),
    "text_holdout": ("raw", "holdout"),
    "knowmem_forget": ("knowmem", "forget_qa"),
    "knowmem_retain": ("knowmem", "retain_qa"),
    "verbmem_forget": ("verbmem", "forget"),
    "knowmem_forget_icl": ("knowmem", "forget_qa_icl"),
    "knowmem_retain_icl": ("knowmem", "retain_qa_icl"),
}
# A local directory names a split either our way (text_forget.jsonl) or as the MUSE repository lays
# out data/<corpus>/ (raw/forget.json, knowmem/retain2_qa.json, ...). The first stem that exists wins.
MUSE_LOCAL_STEMS = {
    "text_forget": ("text_forget", "raw/forget"),
    "text_retain": ("text_retain", "raw/retain1"),
    "text_holdout": ("text_holdout", "raw/holdout"),
    "knowmem_forget": ("knowmem_forget", "knowmem/forget_qa"),
    "knowmem_retain": ("knowmem_retain", "knowmem/retain_qa", "knowmem/retain2_qa"),
    "verbmem_forget": ("verbmem_forget", "verbmem/forget"),
    "knowmem_forget_icl": ("knowmem_forget_icl", "knowmem/forget_qa_icl"),
    "knowmem_retain_icl": ("knowmem_retain_icl", "knowmem/retain_qa_icl", "knowmem/retain2_qa_icl"),
}
# Per stem, the first suffix that exists wins: MUSE ships raw/forget.json (one string per article)
# beside raw/forget.txt (the same articles run together), and the JSON keeps the article boundaries.
_MUSE_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def load_muse(source: str, splits: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """A MUSE corpus by split: ``text_forget``, ``text_retain``, ``text_holdout`` ({"text"} rows),
    ``knowmem_forget``, ``knowmem_retain`` ({"question", "answer"} rows) and, when present,
    ``verbmem_forget`` ({"prompt", "gt"} rows) and the KnowMem examples ``knowmem_*_icl``.

    ``source``: a local directory (see MUSE_LOCAL_STEMS; ``.txt`` files hold documents separated by
    blank lines, ``.json`` a list of rows or plain strings, ``.jsonl`` one per line) or a hub dataset
    such as ``muse-bench/MUSE-News`` (configs ``raw``, ``knowmem``, ``verbmem``). ``splits`` restricts
    what is read; each one named (or, by default, each of MUSE_SPLITS) must exist.
    """
    known = MUSE_SPLITS + MUSE_OPTIONAL_SPLITS
    unknown = [name for name in (splits or ()) if name not in known]
    if unknown:
        raise DataError(f"{source}: no MUSE split '{unknown[0]}' (known: {', '.join(known)})")
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_muse_directory(path, splits)
    if path.exists():
        raise DataError(f"{source}: is a file; a MUSE source is a directory or a dataset name")
    if source.startswith((".", "/", "~")):  # clearly a path, never a hub name
        raise DataError(f"{source}: no such directory")
    return _load_muse_hub(source, list(splits or known))


def _load_muse_directory(directory: Path, splits: Sequence[str] | None) -> dict[str, list[dict]]:
    wanted = list(splits) if splits is not None else list(MUSE_SPLITS + MUSE_OPTIONAL_SPLITS)
    corpus = {}
    for split in wanted:
        path = _find_muse_file(directory, split)
        if path is None:
            if splits is None and split in MUSE_OPTIONAL_SPLITS:
                continue
            tried = ", ".join(f"{stem}{{{','.join(_MUSE_SUFFIXES)}}}" for stem in MUSE_LOCAL_STEMS[split])
            raise DataError(f"{directory}: split '{split}' not found (looked for {tried})")
        rows, numbers = _read_muse_file(path)
        corpus[split] = _muse_rows(split, rows, str(path), numbers)
    return corpus


def _find_muse_file(directory: Path, split: str) -> Path | None:
    for stem in MUSE_LOCAL_STEMS[split]:
        for suffix in _MUSE_SUFFIXES:
            path = directory / f"{stem}{suffix}"
            if path.is_file():
                return path
    return None


def _read_muse_file(path: Path) -> tuple[list, list[int] | None]:
    return read_txt_documents(path) if path.suffix == ".txt" else read_rows(path)


def _muse_rows(split: str, rows: list, where: str, numbers: Sequence[int] | None) -> list[dict]:
    """Validated rows of one split; plain strings in a text split become {"text": ...} rows."""
    if split in _MUSE_TEXT_SPLITS:
        rows = [{"text": row} if isinstance(row, str) else row for row in rows]
        validate_text_split(rows, where, numbers)
    elif split == "verbmem_forget":
        _validate_verbmem(rows, where, numbers)
    else:
        validate_split(rows, where, require_perturbed=False, row_numbers=numbers)
    return rows


def _validate_verbmem(rows: Sequence[Any], where: str, numbers: Sequence[int] | None) -> None:
    if not rows:
        raise DataError(f"{where}: no rows")
    for index, row in enumerate(rows):
        at = f"{where}:{numbers[index] if numbers is not None else index}"
        if not isinstance(row, dict):
            raise DataError(f"{at}: row is not an object but {type(row).__name__}")
        for field in ("prompt", "gt"):
            check_string(row, field, at, required=True)


def _load_muse_hub(name: str, splits: Sequence[str]) -> dict[str, list[dict]]:
    """Splits of a MUSE dataset on the Hugging Face hub; needs network or a populated cache."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise DataError(f"{name}: loading a hub dataset needs the 'datasets' package ({err})") from None
    corpus = {}
    for split in splits:
        config, hub_split = MUSE_HUB_SPLITS[split]
        try:
            rows = datasets.load_dataset(name, config, split=hub_split).to_list()
        except Exception as err:  # the hub client raises many types (connection, not found, offline)
            raise DataError(f"{name}: cannot load config '{config}' split '{hub_split}' (split '{split}') from the "
                            f"Hugging Face hub: {type(err).__name__}: {first_line(err)}") from None
        corpus[split] = _muse_rows(split, rows, f"{name}/{config}/{hub_split}", None)
    return corpus
