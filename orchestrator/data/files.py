"""Reading split files: JSON, JSON Lines, Parquet and blank-line-separated text, with line numbers for errors."""
from __future__ import annotations

import json
from pathlib import Path

from orchestrator.errors import DataError, first_line


def read_text(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path}: empty file")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 at byte {err.start}") from None


# Keys any benchmark row has (question/answer, document, VerbMem prompt): what tells a lone JSON object that
# is one row from a wrapper such as {"rows": [...]}.
ROW_KEYS = {"question", "text", "prompt"}


def read_json_rows(path: Path) -> tuple[list, list[int] | None]:
    """A ``.json`` file's rows: a JSON list, or JSON Lines (one object per line), which is how TOFU ships its
    ``.json`` files. Line numbers come back for JSON Lines (for errors), None for a list."""
    text = read_text(path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg != "Extra data":  # a broken document, not several of them
            raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        return read_jsonl(path)
    if isinstance(rows, dict) and ROW_KEYS & set(rows):  # one row object: JSON Lines with a single line
        return [rows], [1]
    if not isinstance(rows, list):
        kind = f"an object with keys {sorted(rows)[:5]}" if isinstance(rows, dict) else type(rows).__name__
        raise DataError(f"{path}: expected a JSON list of rows or JSON Lines, got {kind}")
    return rows, None


def read_rows(path: Path) -> tuple[list, list[int] | None]:
    """Rows of a ``.json`` (list or JSON Lines), ``.jsonl`` or ``.parquet`` file, with line numbers where
    the format has lines."""
    if path.suffix == ".parquet":
        return read_parquet(path), None
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    return read_json_rows(path)


def read_jsonl(path: Path) -> tuple[list, list[int]]:
    rows, numbers = [], []
    for line_number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_number}: invalid JSON: {err.msg}") from None
        numbers.append(line_number)
    return rows, numbers


def read_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file: {first_line(err)}") from None


def read_txt_documents(path: Path) -> tuple[list[str], list[int]]:
    """Documents separated by blank lines, each with the number of its first line (for errors)."""
    documents, numbers, current, start = [], [], [], 0
    for line_number, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            if not current:
                start = line_number
            current.append(line.rstrip())
        elif current:
            documents.append("\n".join(current))
            numbers.append(start)
            current = []
    if current:
        documents.append("\n".join(current))
        numbers.append(start)
    return documents, numbers
