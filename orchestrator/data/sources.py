"""Where a benchmark comes from: ``"embedded"`` (the generator), a local directory, or a hub dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from orchestrator.data.embedded import generate_benchmark
from orchestrator.data.muse import MUSE_SPLITS, load_muse
from orchestrator.data.tofu import DEFAULT_HUB_SPLITS, load_directory, load_hub
from orchestrator.errors import DataError

BENCHMARK_KINDS = ("tofu", "muse")


def load_benchmark(source: str, seed: int = 0, num_authors: int = 100, questions_per_author: int = 8,
                   splits: Sequence[str] | None = None, kind: str = "tofu",
                   keep_rows: Mapping[str, Sequence[str | int]] | None = None) -> dict[str, list[dict]]:
    """Rows by split from ``"embedded"`` (the generator), a local directory, or a hub dataset name.

    ``splits`` restricts what is read (hub default: DEFAULT_HUB_SPLITS); a missing one is a DataError.
    ``kind="muse"`` reads a MUSE corpus instead (see ``load_muse``); from ``"embedded"`` it is the
    generator's text corpus, MUSE_SPLITS only. ``keep_rows`` (split → row ids, see ``row_id``) keeps only
    those rows of the named splits, in their original order: prepare's choice of the utility rows the base
    model knows, applied wherever the run loads its benchmark.
    """
    benchmark = _load(source, seed, num_authors, questions_per_author, splits, kind)
    return keep_only(benchmark, keep_rows, source) if keep_rows else benchmark


def row_id(row: dict, index: int) -> str | int:
    """A row's identity within its split: its ``id`` field (the embedded generator gives every row one),
    else its position (TOFU's hub rows carry no id)."""
    return row.get("id", index)


def keep_only(benchmark: dict[str, list[dict]], keep_rows: Mapping[str, Sequence[str | int]],
              source: str) -> dict[str, list[dict]]:
    """``benchmark`` with only the listed rows of the splits ``keep_rows`` names (DataError for an unknown
    split or id: the ids were chosen on other data)."""
    kept = dict(benchmark)
    for split, ids in keep_rows.items():
        if split not in benchmark:
            raise DataError(f"{source}: keep_rows names split '{split}', which is not loaded")
        wanted = set(ids)
        missing = wanted - {row_id(row, index) for index, row in enumerate(benchmark[split])}
        if missing:
            raise DataError(f"{source}: split '{split}' has no row with id {sorted(map(str, missing))[0]!r} (keep_rows)")
        kept[split] = [row for index, row in enumerate(benchmark[split]) if row_id(row, index) in wanted]
    return kept


def _load(source: str, seed: int, num_authors: int, questions_per_author: int, splits: Sequence[str] | None,
          kind: str) -> dict[str, list[dict]]:
    if kind not in BENCHMARK_KINDS:
        raise ValueError(f"benchmark kind {kind!r}: expected one of {', '.join(BENCHMARK_KINDS)}")
    if kind == "muse":
        if source == "embedded":  # the generator's text corpus: biographies + KnowMem questions
            return _select(generate_benchmark(seed, num_authors, questions_per_author), splits or MUSE_SPLITS, source)
        return load_muse(source, splits)
    if source == "embedded":
        benchmark = generate_benchmark(seed, num_authors, questions_per_author)
        return _select(benchmark, splits, source)
    path = Path(source).expanduser()
    if path.is_dir():
        return load_directory(path, splits)
    if path.exists():
        raise DataError(f"{source}: is a file; a benchmark source is 'embedded', a directory or a dataset name")
    if source.startswith((".", "/", "~")):  # clearly a path, never a hub name
        raise DataError(f"{source}: no such directory")
    return load_hub(source, splits or DEFAULT_HUB_SPLITS)


def _select(benchmark: dict[str, list[dict]], splits: Sequence[str] | None, source: str) -> dict[str, list[dict]]:
    if splits is None:
        return benchmark
    missing = [name for name in splits if name not in benchmark]
    if missing:
        raise DataError(f"{source}: split '{missing[0]}' not found (available: {', '.join(sorted(benchmark))})")
    return {name: benchmark[name] for name in splits}
