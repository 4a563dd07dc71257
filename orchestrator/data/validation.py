"""Row validation: every malformed row is a one-line DataError naming file, row and field.

Question/answer rows follow TOFU's schema (``question``, ``answer``, optional ``paraphrased_*`` strings and a
``perturbed_answer`` list); document rows (MUSE) carry ``text`` instead of a question.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from orchestrator.errors import DataError


def is_document(row: Mapping[str, Any]) -> bool:
    """A raw-text row (MUSE corpus): ``text`` and no question."""
    return "text" in row and "question" not in row


_TEXT_FIELDS_OPTIONAL = ("paraphrased_question", "paraphrased_answer")


def validate_split(rows: Sequence[Any], file: str, require_perturbed: bool = True,
                   row_numbers: Sequence[int] | None = None) -> None:
    """Raise DataError on the first malformed row of a question/answer split.

    ``row_numbers`` gives the number to report per row (1-based line for JSONL); default: the index.
    Perturbed answers are checked when required or when any row has them, and every row must then
    carry the same number of them.
    """
    if not rows:
        raise DataError(f"{file}: no rows")
    wants_perturbed = require_perturbed or any(isinstance(r, dict) and "perturbed_answer" in r for r in rows)
    first_count: tuple[int, int] | None = None  # (number of perturbed answers, row) of the first row
    seen_ids: dict[Any, int] = {}
    for index, row in enumerate(rows):
        number = row_numbers[index] if row_numbers is not None else index
        where = f"{file}:{number}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: row is not an object but {type(row).__name__}")
        for field in ("question", "answer"):
            check_string(row, field, where, required=True)
        for field in _TEXT_FIELDS_OPTIONAL:
            check_string(row, field, where, required=False)
        if isinstance(row.get("alternate"), list):  # AltPO's made-up answers: one string or a list of them
            _check_string_list(row, "alternate", where)
        else:
            check_string(row, "alternate", where, required=False)
        if wants_perturbed:
            count = _check_perturbed(row, where)
            if first_count is None:
                first_count = (count, number)
            elif count != first_count[0]:
                raise DataError(f"{where}: field 'perturbed_answer': {count} answers, but row {first_count[1]} "
                                f"has {first_count[0]} (all rows of a split need the same number)")
        _check_unique_id(row, where, number, seen_ids)


def validate_text_split(rows: Sequence[Any], file: str, row_numbers: Sequence[int] | None = None) -> None:
    """Raise DataError on the first malformed row of a text corpus split (a ``text`` field per row)."""
    if not rows:
        raise DataError(f"{file}: no rows")
    seen_ids: dict[Any, int] = {}
    for index, row in enumerate(rows):
        number = row_numbers[index] if row_numbers is not None else index
        where = f"{file}:{number}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: row is not an object but {type(row).__name__}")
        check_string(row, "text", where, required=True)
        _check_unique_id(row, where, number, seen_ids)


def check_string(row: dict, field: str, where: str, required: bool, needed_for: str | None = None) -> None:
    if field not in row:
        if required:
            raise DataError(f"{where}: field '{field}': missing" + (f", needed for {needed_for}" if needed_for else ""))
        return
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}': expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{field}': empty string")


def _check_perturbed(row: dict, where: str) -> int:
    if "perturbed_answer" not in row:
        raise DataError(f"{where}: field 'perturbed_answer': missing")
    return _check_string_list(row, "perturbed_answer", where)


def _check_string_list(row: dict, field: str, where: str) -> int:
    value = row[field]
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{field}': expected a list of strings, got {type(value).__name__}")
    if not value:
        raise DataError(f"{where}: field '{field}': empty list (need at least 1 answer)")
    for position, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise DataError(f"{where}: field '{field}': item {position} is not a non-empty string")
    return len(value)


def _check_unique_id(row: dict, where: str, number: int, seen: dict[Any, int]) -> None:
    if "id" not in row:
        return
    row_id = row["id"]
    if not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
        raise DataError(f"{where}: field 'id': expected a string or integer, got {type(row_id).__name__}")
    if row_id in seen:
        raise DataError(f"{where}: field 'id': duplicated value {row_id!r} (first at row {seen[row_id]})")
    seen[row_id] = number


def _require_splits(benchmark: Mapping[str, Sequence[dict]], forget_split: str, retain_split: str,
                    holdout_split: str) -> str:
    """The three role splits exist; returns the available split names, for further messages."""
    available = ", ".join(sorted(benchmark)) or "none"
    for role, name in (("forget_split", forget_split), ("retain_split", retain_split), ("holdout_split", holdout_split)):
        if name not in benchmark:
            raise DataError(f"{role}: split '{name}' not in the data (available: {available})")
    return available


# TOFU's utility sets: their truth ratio compares the answer with wrong answers of the same kind.
UTILITY_SPLITS = ("real_authors", "world_facts")
RETAIN_PERTURBED = "retain_perturbed"  # TOFU's evaluation set for the retain metrics, when present


def check_splits(benchmark: Mapping[str, Sequence[dict]], forget_split: str, retain_split: str,
                 holdout_split: str, utility_sets: bool = True) -> None:
    """Every split the run trains on or the evaluation reads exists with the fields it needs (a missing one
    would otherwise come out as null metrics, or fail mid-run), and the forget split is not the whole data."""
    available = _require_splits(benchmark, forget_split, retain_split, holdout_split)
    forget, retain = benchmark[forget_split], benchmark[retain_split]
    validate_split(forget, forget_split, require_perturbed=True)
    _require_field(forget, forget_split, "paraphrased_answer", "the forget truth ratio")
    if not retain:
        raise DataError(f"retain_split: split '{retain_split}' has no rows")
    retain_eval = RETAIN_PERTURBED if benchmark.get(RETAIN_PERTURBED) else retain_split
    validate_split(benchmark[retain_eval], retain_eval, require_perturbed=True)
    _require_field(benchmark[retain_eval], retain_eval, "paraphrased_answer", "the retain truth ratio")
    for name in UTILITY_SPLITS if utility_sets else ():
        if not benchmark.get(name):
            raise DataError(f"split '{name}': missing, needed for model utility (available: {available}); "
                            "set evaluation.utility_sets: false to score without it")
        validate_split(benchmark[name], name, require_perturbed=True)
    total = len(benchmark["full"]) if "full" in benchmark else len(forget) + len(retain)
    if len(forget) >= total:
        raise DataError(f"forget_split: split '{forget_split}' has {len(forget)} rows, "
                        f"not fewer than the {total} rows of the whole data")


def _require_field(rows: Sequence[dict], split: str, field: str, needed_for: str) -> None:
    for index, row in enumerate(rows):
        check_string(row, field, f"{split}:{index}", required=True, needed_for=needed_for)


def check_muse_splits(benchmark: Mapping[str, Sequence[dict]], forget_split: str, retain_split: str,
                      holdout_split: str) -> None:
    """The text splits a MUSE run trains and scores on exist and hold documents, and KnowMem is there."""
    available = _require_splits(benchmark, forget_split, retain_split, holdout_split)
    for name in (forget_split, retain_split, holdout_split):
        validate_text_split(benchmark[name], name)
    for name in ("knowmem_forget", "knowmem_retain"):
        if name not in benchmark:
            raise DataError(f"split '{name}': missing, needed for KnowMem (available: {available})")
        validate_split(benchmark[name], name, require_perturbed=False)
