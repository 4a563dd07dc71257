"""Where a benchmark comes from: ``"embedded"`` (the generator), a local directory, or a hub dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from orchestrator.data.embedded import generate_benchmark
from orchestrator.data.muse import MUSE_SPLITS, load_muse
from orchestrator.data.tofu import DEFAULT_HUB_SPLITS, load_directory, load_hub
from orchestrator.errors import DataError

BENCHMARK_KINDS = ("tofu", "muse")


def load_benchmark(source: str, seed: int = 0, num_authors: int = 100, questions_per_author: int = 8,
                   splits: Sequence[str] | None = None, kind: str = "tofu") -> dict[str, list[dict]]:
    """Rows by split from ``"embedded"`` (the generator), a local directory, or a hub dataset name.

    ``splits`` restricts what is read (hub default: DEFAULT_HUB_SPLITS); a missing one is a DataError.
    ``kind="muse"`` reads a MUSE corpus instead (see ``load_muse``); from ``"embedded"`` it is the
    generator's text corpus, MUSE_SPLITS only.
    """
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
