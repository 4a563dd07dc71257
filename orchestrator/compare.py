"""Ranking of unlearning trials and methods on (forget quality ↑, utility loss ↓).

Every decision here is a pure function over Arrow tables or plain lists, so it is tested without a
cluster; ``compare_runs`` is the only function that touches files, and it reads and writes through
``results`` and ``report``.

Forget quality (FQ) is a KS p-value spanning hundreds of orders of magnitude, so it is compared as
``log10(FQ)``; utility loss is ``1 − MU/MU_target``. Per trial the best epoch under a utility-loss
ceiling represents the trial; trials are Pareto-ranked, then ordered within a front by FQ and cost.

The forget axis is chosen per table (``results.forget_axis``, rule in ``scores.forget_axis``): log10 FQ
where forget quality was measured; on MUSE runs (``benchmark.kind: muse``), which have no truth ratios,
VerbMem on the forget text (lower is better: the ranking maximises ``−verbmem_forget``), with model
utility = KnowMem on retain questions and ``utility_loss = 1 − knowmem_retain / knowmem_retain(target)``
of the same run; on TOFU runs without a retain model (no forget quality), the forget-answer probability
(lower is better). Everything else — the ceiling, best epoch, fronts, cost tie-break — is the same.
``log10_fq`` stays NaN where FQ was not measured.
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings as warnings_module
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from orchestrator import report, results, scores
from orchestrator.probe_view import PROBE_FIELDS, probed_forget, split_probe_rows, worst_probe
from orchestrator.results import REFERENCE_METHODS, benchmark_kind, forget_axis
DEFAULT_UTILITY_CEILING = 0.10

# Columns best_epochs adds to the chosen evaluation row of each trial.
SUMMARY_FIELDS = (
    pa.field("epochs_evaluated", pa.int64()),  # highest epoch the trial reached
    pa.field("worker_seconds", pa.float64()),  # Σ over rows of (train + eval seconds) × num_workers
    pa.field("log10_fq", pa.float64()),  # NaN when FQ is missing; −300 when it underflowed (scores.FQ_FLOOR)
    pa.field("over_ceiling", pa.bool_()),  # no measured epoch had utility_loss ≤ ceiling
    pa.field("reference", pa.bool_()),  # a target / retain row, shown but never ranked
)
RANK_FIELDS = (pa.field("rank", pa.int64()), pa.field("front", pa.int64()))
_REQUIRED_EVALS_COLUMNS = ("run_id", "trial_id", "method", "status", "epoch", "forget_quality", "utility_loss")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """What a comparison produced: the rows it read, both rankings, warnings and the files written."""

    evals: pa.Table
    ranked: pa.Table  # one row per trial (rank order), then the reference rows (rank null)
    methods: pa.Table  # one row per method (its best trial), then the reference rows
    run_ids: list[str]
    warnings: list[str]
    utility_ceiling: float
    ranking_path: Path | None = None
    report_paths: dict[str, Path] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Numbers


def _as_float(value: Any) -> float:
    """Null → NaN so that missing and diverged metrics take the same path."""
    return math.nan if value is None else float(value)


def log10_forget_quality(forget_quality: Any) -> float:
    """scores.log10_forget_quality with NaN for "not measured", the ranking's float convention."""
    value = scores.log10_forget_quality(forget_quality)
    return math.nan if value is None else value


def _is_measured(forget: float, utility_loss: Any) -> bool:
    return not math.isnan(forget) and not math.isnan(_as_float(utility_loss))


def forget_function(axis: str) -> Callable[[dict[str, Any]], float]:
    """The forget score a ranking maximises, per row (scores.forget_score on ``axis``); NaN if missing."""
    return lambda row: _as_float(scores.forget_score(row, axis))


def muse_utility(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """MUSE rows with ``model_utility`` = KnowMem-retain and ``utility_loss`` = 1 − it / the same run's
    target's, where the evaluation did not already fill them (copies; other values untouched)."""
    target_knowmem = {row["run_id"]: row.get("knowmem_retain") for row in rows if row["method"] == "target"}
    out = []
    for row in rows:
        row = dict(row)
        knowmem = row.get("knowmem_retain")
        if row.get("model_utility") is None:
            row["model_utility"] = knowmem
        reference = target_knowmem.get(row["run_id"])
        if row.get("utility_loss") is None and knowmem is not None and reference:
            row["utility_loss"] = 1.0 - knowmem / reference
        out.append(row)
    return out


def _worker_seconds(rows: list[dict[str, Any]]) -> float:
    # Missing timings count as 0 and a missing worker count as 1: cost is a tie-breaker, not a metric.
    total = 0.0
    for row in rows:
        seconds = sum(0.0 if math.isnan(_as_float(row.get(k))) else float(row[k]) for k in ("train_seconds", "eval_seconds"))
        total += seconds * (row.get("num_workers") or 1)
    return total


# ---------------------------------------------------------------------------------------------
# Best epoch per trial


def _rows_by_trial(evals: pa.Table) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(run_id, trial_id) → rows in epoch order, one per epoch (the later row wins a duplicate).

    Keyed by run as well as trial so that two runs reusing a trial name never merge.
    """
    missing = [name for name in _REQUIRED_EVALS_COLUMNS if name not in evals.column_names]
    if missing:
        raise ValueError(f"evals table lacks columns {missing}; read it with results.read_evals")
    by_trial: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for row in split_probe_rows(evals.to_pylist())[0]:
        if row["trial_id"] is None or row["epoch"] is None:
            raise ValueError(f"evals row without trial_id or epoch: run {row['run_id']!r}, trial {row['trial_id']!r}")
        by_trial.setdefault((row["run_id"], row["trial_id"]), {})[row["epoch"]] = row
    return {key: [rows[e] for e in sorted(rows)] for key, rows in sorted(by_trial.items(), key=lambda kv: (str(kv[0][0]), kv[0][1]))}


def _trial_summary(rows: list[dict[str, Any]], utility_ceiling: float, reference: bool, axis: str) -> dict[str, Any]:
    chosen, over_ceiling = (rows[-1], False) if reference else scores.choose_row(rows, utility_ceiling, axis)
    summary = dict(chosen)
    summary.update(
        status=rows[-1]["status"],  # latest status: a trial that diverged after its best epoch says so
        epochs_evaluated=rows[-1]["epoch"],
        worker_seconds=_worker_seconds(rows),
        log10_fq=log10_forget_quality(chosen["forget_quality"]),
        over_ceiling=over_ceiling,
        reference=reference,
    )
    return summary


def best_epochs(evals: pa.Table, utility_ceiling: float = DEFAULT_UTILITY_CEILING) -> pa.Table:
    """One row per trial: its best evaluation with ``utility_loss ≤ utility_ceiling``.

    Best = highest log10(FQ) (MUSE: lowest VerbMem), ties → lower utility loss → earlier epoch. A trial
    with no measured epoch under the ceiling keeps its lowest-utility-loss epoch with ``over_ceiling=True``;
    a trial with no measured epoch at all keeps its last row. ``status`` is the trial's latest status.
    Reference rows (method ``target`` / ``retain``) come after the trials with ``reference=True``.
    """
    if not math.isfinite(utility_ceiling):
        raise ValueError(f"utility_ceiling must be a finite number, got {utility_ceiling}")
    axis = forget_axis(evals)
    if benchmark_kind(evals) == "muse":
        evals = pa.Table.from_pylist(muse_utility(evals.to_pylist()), schema=evals.schema)
    trials, references = [], []
    probes = split_probe_rows(evals.to_pylist())[1]
    for rows in _rows_by_trial(evals).values():
        is_reference = rows[-1]["method"] in REFERENCE_METHODS
        summary = _trial_summary(rows, utility_ceiling, is_reference, axis)
        (references if is_reference else trials).append(summary | worst_probe(summary, probes, axis))
    references.sort(key=lambda r: (str(r["run_id"]), REFERENCE_METHODS.index(r["method"])))  # target, then retain
    schema = evals.schema
    for added in SUMMARY_FIELDS + PROBE_FIELDS:
        schema = schema.append(added)
    return pa.Table.from_pylist(trials + references, schema=schema)


# ---------------------------------------------------------------------------------------------
# Pareto ranking


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """a is at least as good on both axes (x ↑, y ↓) and strictly better on one."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def pareto_fronts(points: list[tuple[float, float]]) -> list[int]:
    """Front index per point, maximising x and minimising y (0 = non-dominated).

    Fronts are peeled off one at a time (non-dominated sorting). Identical points do not dominate
    each other, so they share a front. Points with a NaN coordinate get the front after the last one.
    """
    fronts = [0] * len(points)
    remaining = [i for i, (x, y) in enumerate(points) if not (math.isnan(_as_float(x)) or math.isnan(_as_float(y)))]
    unmeasured = sorted(set(range(len(points))) - set(remaining))
    front = 0
    while remaining:
        current = [i for i in remaining if not any(_dominates(points[j], points[i]) for j in remaining)]
        for i in current:
            fronts[i] = front
        done = set(current)
        remaining = [i for i in remaining if i not in done]
        front += 1
    for i in unmeasured:
        fronts[i] = front
    return fronts


def _summary_forget(table: pa.Table) -> Callable[[dict[str, Any]], float]:
    """The forget axis of summary rows (``best_epochs`` output)."""
    return forget_function(forget_axis(table))


def _ranking_group(row: dict[str, Any], forget: Callable[[dict[str, Any]], float]) -> int:
    """0 measured within the ceiling, 1 measured over it, 2 unmeasured (NaN): groups never interleave."""
    if not _is_measured(forget(row), row["utility_loss"]):
        return 2
    return 1 if row["over_ceiling"] else 0


def _pareto_order(rows: list[dict[str, Any]], forget: Callable[[dict[str, Any]], float]) -> list[dict[str, Any]]:
    """Set ``front`` and ``rank`` on copies of ``rows`` and return them in rank order.

    Fronts are computed within each group and numbered on after the previous group's, so front
    order and rank order agree. Within a front: higher FQ (MUSE: lower VerbMem), then fewer worker-seconds.
    """
    ordered: list[dict[str, Any]] = []
    offset = 0
    for group in (0, 1, 2):
        members = [dict(row) for row in rows if _ranking_group(row, forget) == group]
        if not members:
            continue
        fronts = pareto_fronts([(forget(row), _as_float(row["utility_loss"])) for row in members])
        for row, front in zip(members, fronts):
            row["front"] = offset + front
        offset = max(row["front"] for row in members) + 1
        ordered += sorted(members, key=lambda row: _within_front_key(row, forget))
    for rank, row in enumerate(ordered, start=1):
        row["rank"] = rank
    return ordered


def _within_front_key(row: dict[str, Any], forget: Callable[[dict[str, Any]], float]) -> tuple:
    score = forget(row)
    forget_key = math.inf if math.isnan(score) else -score
    return (row["front"], forget_key, row["worker_seconds"], str(row["run_id"]), str(row["trial_id"]))


def _require_columns(table: pa.Table, names: tuple[str, ...], producer: str) -> None:
    missing = [name for name in names if name not in table.column_names]
    if missing:
        raise ValueError(f"table lacks columns {missing}; pass the output of {producer}")


def rank_trials(best: pa.Table, robust: bool = False) -> pa.Table:
    """``best`` with ``rank`` (1..n) and ``front`` first, trials in rank order, then the reference rows.

    Order: within-ceiling trials by Pareto front on (log10 FQ ↑, utility loss ↓) — MUSE: (VerbMem ↓,
    utility loss ↓) — within a front higher FQ (lower VerbMem) then fewer worker-seconds; then
    over-ceiling trials ranked the same way; then trials without measured metrics. Reference rows keep
    ``rank`` and ``front`` null. ``robust``: the forget axis after each trial's worst probe instead of its
    own (probe_view.py).
    """
    _require_columns(best, tuple(f.name for f in SUMMARY_FIELDS) + ("utility_loss",), "best_epochs")
    rows = best.to_pylist()
    forget = probed_forget if robust else _summary_forget(best)
    trials = _pareto_order([row for row in rows if not row["reference"]], forget)
    references = [row for row in rows if row["reference"]]
    schema = pa.schema(list(RANK_FIELDS) + [f for f in best.schema if f.name not in ("rank", "front")])
    return pa.Table.from_pylist(trials + references, schema=schema)


def rank_methods(ranked: pa.Table) -> pa.Table:
    """One row per method — its best-ranked trial — Pareto-ranked among methods like ``rank_trials``.

    Adds ``trials`` (how many trials the method ran) and ``trial_rank`` (the trial's rank among all
    trials); reference rows follow with null ranks.
    """
    _require_columns(ranked, ("rank", "front") + tuple(f.name for f in SUMMARY_FIELDS), "rank_trials")
    rows = ranked.to_pylist()
    best_by_method: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    for row in rows:
        if row["reference"]:
            continue
        counts[row["method"]] = counts.get(row["method"], 0) + 1
        if row["method"] not in best_by_method or row["rank"] < best_by_method[row["method"]]["rank"]:
            best_by_method[row["method"]] = row
    methods = [dict(row, trial_rank=row["rank"], trials=counts[method]) for method, row in best_by_method.items()]
    references = [dict(row, trial_rank=None, trials=None) for row in rows if row["reference"]]
    extra = [pa.field("trials", pa.int64()), pa.field("trial_rank", pa.int64())]
    schema = pa.schema(list(RANK_FIELDS) + extra + [f for f in ranked.schema if f.name not in ("rank", "front")])
    return pa.Table.from_pylist(_pareto_order(methods, _summary_forget(ranked)) + references, schema=schema)


# ---------------------------------------------------------------------------------------------
# Whole comparison


def comparability_warnings(ranked: pa.Table, utility_ceiling: float) -> list[str]:
    """Reasons the ranked trials are not like for like (different scaling or batch), or no trial qualified."""
    trials = [row for row in ranked.to_pylist() if not row["reference"]]
    messages = []
    for column, consequence in (
        ("num_workers", "worker-seconds and wall-clock times are not like for like"),
        ("effective_batch", "optimisation differs between trials, so hyperparameters do not transfer"),
    ):
        values = sorted({row.get(column) for row in trials if row.get(column) is not None})
        if len(values) > 1:
            messages.append(f"compared trials differ in {column} ({', '.join(map(str, values))}): {consequence}")
    forget = _summary_forget(ranked)
    if trials and not any(_ranking_group(row, forget) == 0 for row in trials):
        messages.append(f"no trial reached utility loss <= {utility_ceiling:g}; the ranking shows least-bad epochs")
    return messages


def compare_evals(evals: pa.Table, utility_ceiling: float = DEFAULT_UTILITY_CEILING, robust: bool = False) -> Comparison:
    """Rank trials and methods of an in-memory evals table (nothing is written); ``robust``: on the forget
    axis after the worst robustness probe."""
    ranked = rank_trials(best_epochs(evals, utility_ceiling), robust)
    run_ids = list(dict.fromkeys(r for r in evals.column("run_id").to_pylist() if r is not None))
    return Comparison(
        evals=evals,
        ranked=ranked,
        methods=rank_methods(ranked),
        run_ids=run_ids,
        warnings=comparability_warnings(ranked, utility_ceiling),
        utility_ceiling=utility_ceiling,
    )


def _read_sources(sources: list[str | os.PathLike]) -> pa.Table:
    if not sources:
        raise ValueError("compare needs at least one run directory or evals Parquet file")
    tables = []
    for source in sources:
        if not Path(source).exists():
            raise ValueError(f"compare source does not exist: {source}")
        table = results.read_evals(source)
        if table.num_rows == 0:
            raise ValueError(f"no evaluation rows in {source} (expected a run directory with evals/*.parquet or an evals Parquet file)")
        tables.append(table)
    return pa.concat_tables(tables, promote_options="default")  # extra.* columns differ between runs


def compare_runs(
    sources: list[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    utility_ceiling: float = DEFAULT_UTILITY_CEILING,
    robust: bool = False,
) -> Comparison:
    """Read run directories (or evals Parquet files), rank, write ``ranking.parquet`` and ``report/``.

    ``out_dir`` defaults to the first source (its directory when it is a file). Warnings about
    trials that are not like for like are both raised with ``warnings.warn`` and returned.
    """
    comparison = compare_evals(_read_sources(sources), utility_ceiling, robust)
    if out_dir is None:
        first = Path(sources[0])
        out_dir = first if first.is_dir() else first.parent
    out_dir = Path(out_dir)
    for message in comparison.warnings:
        warnings_module.warn(message, stacklevel=2)
    ranking_path = results.write_table_atomic(comparison.ranked, out_dir / "ranking.parquet")
    report_paths = report.write_report(
        out_dir / "report",
        evals=comparison.evals,
        ranked=comparison.ranked,
        methods=comparison.methods,
        run_ids=comparison.run_ids,
        warnings=comparison.warnings,
        utility_ceiling=utility_ceiling,
    )
    return dataclasses.replace(comparison, ranking_path=ranking_path, report_paths=report_paths)


def format_table(ranked: pa.Table) -> str:
    """The ranking (of ``rank_trials`` or ``rank_methods``) as an aligned plain-text table."""
    headers, rows = report.table_cells(ranked)
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [headers, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    notes = report.table_notes(ranked)
    return "\n".join(lines + ([""] + notes if notes else []))
