"""The bench's table: one row per figure beside its baseline, and its Parquet and Markdown outputs."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from orchestrator.measure import machine_description


@dataclass(frozen=True)
class BenchRow:
    section: str
    figure: str
    value: float | None
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None
    machine: str = ""


def ratio(value: float | None, baseline_value: float | None) -> float | None:
    """value / baseline, or None when either is missing, not finite, or the baseline is 0."""
    if value is None or baseline_value is None:
        return None
    if not (math.isfinite(value) and math.isfinite(baseline_value)) or baseline_value == 0:
        return None
    return value / baseline_value


def measured(section: str, figure: str, value: float | None, unit: str, baseline: str | None = None,
             baseline_value: float | None = None, comparable: bool = True) -> BenchRow:
    """A row; ``comparable=False`` for figures whose quotient means nothing (scores of either sign)."""
    return BenchRow(section, figure, value, unit, baseline, baseline_value,
                    ratio(value, baseline_value) if comparable else None)


def with_machine(rows: Sequence[BenchRow], machine: str) -> list[BenchRow]:
    return [BenchRow(**{**asdict(row), "machine": machine}) for row in rows]


def number(value: float | None) -> str:
    if value is None:
        return "–"
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:,.4g}" if abs(value) >= 1000 else f"{value:.4g}"


def table_cells(row: BenchRow) -> list[str]:
    return [row.section, row.figure, number(row.value), row.baseline or "", number(row.baseline_value),
            number(row.ratio), row.unit]


TABLE_HEADER = ["section", "figure", "value", "baseline", "baseline value", "ratio", "unit"]


def format_table(rows: Sequence[BenchRow]) -> str:
    """Fixed-width text table for the terminal."""
    cells = [TABLE_HEADER] + [table_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[BenchRow]) -> str:
    def escape(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(escape(cell) for cell in table_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def bench_schema():
    import pyarrow as pa

    return pa.schema([("section", pa.string()), ("figure", pa.string()), ("value", pa.float64()),
                      ("baseline", pa.string()), ("baseline_value", pa.float64()), ("ratio", pa.float64()),
                      ("unit", pa.string()), ("machine", pa.string())])


def write_outputs(rows: Sequence[BenchRow], out_dir: Path, notes: Sequence[str]) -> tuple[Path, Path]:
    """bench.parquet (one row per figure) and bench.md (the table plus how each figure was measured)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    parquet, markdown = out_dir / "bench.parquet", out_dir / "bench.md"
    schema = bench_schema()
    table = pa.table({name: [getattr(row, name) for row in rows] for name in schema.names}, schema=schema)
    pq.write_table(table, parquet)
    machine = rows[0].machine if rows else machine_description()
    text = [f"# make bench — {machine}", "", markdown_table(rows), "", "## How each figure is measured", ""]
    text += [f"- {note}" for note in notes]
    markdown.write_text("\n".join(text) + "\n")
    return parquet, markdown
