"""The Arrow schemas of a run's results and the only code that writes or reads them.

One Parquet file per trial and evaluation (``evals/<trial_id>-e<epoch>.parquet``), so nothing is ever
rewritten; every write goes to a temporary name in the same directory and is renamed into place, so a
reader never sees a partial file.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

METRIC_COLUMNS = (
    "forget_quality", "model_utility", "utility_loss", "forget_truth_ratio", "forget_prob", "forget_rouge",
    "retain_prob", "retain_rouge", "retain_truth_ratio", "ra_prob", "ra_rouge", "ra_truth_ratio",
    "wf_prob", "wf_rouge", "wf_truth_ratio", "extraction_strength", "exact_memorization",
    "mia_loss_auc", "mia_zlib_auc", "mia_mink_auc", "mia_minkpp_auc", "mia_gradnorm_auc", "mia_reference_auc",
    "privleak",
    "verbmem_forget", "knowmem_forget", "knowmem_retain",
)
COST_COLUMNS = (
    ("train_seconds", pa.float64()), ("eval_seconds", pa.float64()), ("tokens", pa.int64()),
    ("num_workers", pa.int64()), ("zero_stage", pa.int64()), ("per_worker_batch", pa.int64()),
    ("grad_accum", pa.int64()), ("effective_batch", pa.int64()),
)
STATUSES = ("running", "ok", "diverged", "failed", "stopped")
# ``method`` of the reference rows of a run (epoch 0): the model before unlearning, the one never trained on
# the forget set, and (with ``model.base``) the pretrained model both were fine-tuned from. They are shown
# beside the trials, never ranked among them.
REFERENCE_METHODS = ("target", "retain", "base")

EVALS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()), ("trial_id", pa.string()), ("method", pa.string()), ("params", pa.string()),
        ("status", pa.string()), ("epoch", pa.int64()), ("step", pa.int64()),
        # null for the trial itself; "relearn", "int8", "int4" for a robustness probe of its checkpoint
        ("probe", pa.string()),
    ]
    + [(name, pa.float64()) for name in METRIC_COLUMNS]
    + list(COST_COLUMNS)
    + [("seed", pa.int64()), ("spec_hash", pa.string()), ("git_sha", pa.string()), ("versions", pa.string()),
       # "tofu" or "muse": which forget axis the comparison uses (scores.forget_axis)
       ("benchmark", pa.string()),
       # how truth ratios were aggregated (evaluation.truth_ratio_aggregator): it changes forget quality
       ("truth_ratio_aggregator", pa.string()),
       # JSON {metric: why it is null}: a metric that was not measured carries no stand-in value
       ("not_measured", pa.string())]
)
# Method-specific numbers go in extra.<name> float64 columns appended after the schema's own.

SAMPLES_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()), ("trial_id", pa.string()), ("epoch", pa.int64()), ("split", pa.string()),
        ("index", pa.int64()), ("metric", pa.string()), ("value", pa.float64()),
    ]
)


def write_table_atomic(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write Parquet to a hidden temporary name beside ``path``, fsync, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def evals_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Rows → table with EVALS_SCHEMA's columns (missing ones null) plus any ``extra.*`` columns."""
    rows = [dict(row) for row in rows]
    for row in rows:
        for key in ("params", "versions", "not_measured"):
            if isinstance(row.get(key), dict):
                row[key] = json.dumps(row[key], sort_keys=True)
    extras = sorted({key for row in rows for key in row if key.startswith("extra.")})
    unknown = sorted({key for row in rows for key in row} - set(EVALS_SCHEMA.names) - set(extras))
    if unknown:
        raise ValueError(f"evals row has columns outside the schema: {unknown}")
    schema = EVALS_SCHEMA
    for name in extras:
        schema = schema.append(pa.field(name, pa.float64()))
    columns = {name: [_float_or_none(row.get(name)) if schema.field(name).type == pa.float64() else row.get(name)
                      for row in rows] for name in schema.names}
    return pa.table(columns, schema=schema)


def samples_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    rows = list(rows)
    return pa.table({name: [row[name] for row in rows] for name in SAMPLES_SCHEMA.names}, schema=SAMPLES_SCHEMA)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def eval_file_name(trial_id: str, epoch: int, probe: str | None = None) -> str:
    return f"{trial_id}-e{epoch:04d}" + (f"-{probe}" if probe else "") + ".parquet"


def write_evals(run_dir: str | os.PathLike, rows: list[dict[str, Any]], trial_id: str, epoch: int,
                probe: str | None = None) -> Path:
    return write_table_atomic(evals_table(rows), Path(run_dir) / "evals" / eval_file_name(trial_id, epoch, probe))


def has_evals(run_dir: str | os.PathLike, trial_id: str, epoch: int, probe: str | None = None) -> bool:
    """Whether that row was written already (a resumed trial does not redo finished probes)."""
    return (Path(run_dir) / "evals" / eval_file_name(trial_id, epoch, probe)).exists()


def write_samples(run_dir: str | os.PathLike, rows: list[dict[str, Any]], trial_id: str, epoch: int) -> Path:
    return write_table_atomic(samples_table(rows), Path(run_dir) / "samples" / eval_file_name(trial_id, epoch))


def _read_dir(directory: Path, schema: pa.Schema) -> pa.Table:
    files = sorted(p for p in directory.glob("*.parquet") if not p.name.startswith(".")) if directory.exists() else []
    if not files:
        return schema.empty_table()
    tables = [pq.read_table(p) for p in files]
    return pa.concat_tables(tables, promote_options="default")


def read_evals(source: str | os.PathLike) -> pa.Table:
    """All evaluation rows of a run directory (its ``evals/``) or of one Parquet file with that schema.

    When a trial was restarted and evaluated an epoch twice, the newest file wins (one row per epoch).
    """
    source = Path(source)
    table = pq.read_table(source) if source.is_file() else _read_dir(source / "evals", EVALS_SCHEMA)
    return table


def samples_path(eval_out: str | os.PathLike) -> Path:
    """Where a reference evaluation's per-example values sit, beside its JSON (``target.json`` →
    ``target.samples.parquet``)."""
    eval_out = Path(eval_out)
    return eval_out.with_name(eval_out.stem + ".samples.parquet")


def write_reference_samples(eval_out: str | os.PathLike, samples: list[dict[str, Any]]) -> Path:
    """A reference evaluation's samples (split, index, metric, value), identity columns left empty: the run
    that uses the evaluation fills them in (``copy_reference_samples``)."""
    rows = [dict(s, run_id="", trial_id="", epoch=0) for s in samples]
    return write_table_atomic(samples_table(rows), samples_path(eval_out))


def copy_reference_samples(eval_out: str | os.PathLike, run_dir: str | os.PathLike, run_id: str, trial_id: str) -> None:
    """A cached reference evaluation's samples into a run's samples table, under the run's and row's ids."""
    source = samples_path(eval_out)
    if not source.exists():
        return
    table = pq.read_table(source)
    n = table.num_rows
    table = table.set_column(0, "run_id", pa.array([run_id] * n, pa.string()))
    table = table.set_column(1, "trial_id", pa.array([trial_id] * n, pa.string()))
    write_table_atomic(table, Path(run_dir) / "samples" / eval_file_name(trial_id, 0))


def read_samples(run_dir: str | os.PathLike) -> pa.Table:
    return _read_dir(Path(run_dir) / "samples", SAMPLES_SCHEMA)


def _measured(evals: pa.Table, column: str) -> bool:
    return column in evals.column_names and any(v is not None and v == v for v in evals.column(column).to_pylist())


def benchmark_kind(evals: pa.Table) -> str:
    """``"tofu"`` or ``"muse"``: the rows' ``benchmark`` column; for tables written before it existed, "muse"
    when no row has a forget quality but some row has VerbMem."""
    if "benchmark" in evals.column_names:
        kinds = {v for v in evals.column("benchmark").to_pylist() if v}
        if kinds:
            return "muse" if kinds == {"muse"} else "tofu"
    return "muse" if not _measured(evals, "forget_quality") and _measured(evals, "verbmem_forget") else "tofu"


def forget_axis(evals: pa.Table) -> str:
    """The forget axis these rows are compared on (scores.forget_axis)."""
    from orchestrator.scores import forget_axis as axis_for

    return axis_for(benchmark_kind(evals), _measured(evals, "forget_quality"))
