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


def read_json_list(path: Path) -> list:
    try:
        rows = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    return rows


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
