"""Ranking and report on hand-made evals tables.

Expected fronts, chosen epochs and costs are worked out by hand in the comments next to each table.
"""
from __future__ import annotations

import ast
import base64
import math
import re
import warnings

import pyarrow.parquet as pq
import pytest

from orchestrator import compare, report, results
from tests.conftest import ROOT

NAN = math.nan


def _row(trial: str, method: str, epoch: int, fq: float | None, loss: float | None, *, status: str = "ok",
         run_id: str = "run-a", train: float | None = 10.0, evaluate: float | None = 2.0, workers: int | None = 1,
         batch: int = 8, **extra) -> dict:
    mu = None if loss is None or math.isnan(loss) else 0.5 * (1 - loss)  # MU_target = 0.5
    return dict(run_id=run_id, trial_id=trial, method=method, params={"lr": 1e-5, "trial": trial}, status=status,
                epoch=epoch, step=10 * epoch, forget_quality=fq, utility_loss=loss, model_utility=mu,
                train_seconds=train, eval_seconds=evaluate, num_workers=workers, effective_batch=batch, **extra)


def _references(run_id: str = "run-a") -> list[dict]:
    return [_row("target", "target", 0, 1e-12, 0.0, run_id=run_id, train=None, evaluate=3.0),
            _row("retain", "retain", 0, 1.0, 0.04, run_id=run_id, train=None, evaluate=3.0)]


def _by_trial(table) -> dict[str, dict]:
    return {row["trial_id"]: row for row in table.to_pylist()}


# ---------------------------------------------------------------------------------------------
# pareto_fronts


def test_pareto_fronts_dominated_points_fall_to_later_fronts_and_ties_share():
    # maximise x, minimise y:
    # p0 (0, .1) and p2 (0, .1) identical → neither dominates → both front 0; p3 (-2, .05) has the lowest y → front 0;
    # p5 (-1, .1) is dominated by p0 (higher x, same y) → front 1; p1 (-1, .2) is dominated by p5 → front 2;
    # p4 has NaN → after the last front → 3.
    points = [(0.0, 0.1), (-1.0, 0.2), (0.0, 0.1), (-2.0, 0.05), (NAN, 0.1), (-1.0, 0.1)]
    assert compare.pareto_fronts(points) == [0, 2, 0, 0, 3, 1]


def test_pareto_fronts_edge_cases():
    assert compare.pareto_fronts([]) == []
    assert compare.pareto_fronts([(NAN, NAN), (0.0, NAN)]) == [0, 0]  # nothing measured: one last front
    # log10(0) = -inf is a real (worst) x: dominated by (-3, 0) which has the same y.
    assert compare.pareto_fronts([(-math.inf, 0.0), (-3.0, 0.0)]) == [1, 0]


# ---------------------------------------------------------------------------------------------
# best_epochs


def _three_epoch_trial() -> list[dict]:
    # epoch 0 is the untouched target (never chosen); then FQ rises while utility loss grows.
    return [_row("t1", "npo", 0, 1e-12, 0.0), _row("t1", "npo", 1, 1e-6, 0.02),
            _row("t1", "npo", 2, 1e-3, 0.08), _row("t1", "npo", 3, 1e-1, 0.25)]


@pytest.mark.parametrize("ceiling, epoch, over", [(0.10, 2, False), (0.30, 3, False), (0.02, 1, False), (0.01, 1, True)])
def test_utility_ceiling_changes_chosen_epoch(ceiling, epoch, over):
    # ≤0.10 admits epochs 1-2 → highest FQ is epoch 2; ≤0.30 admits 3; ≤0.02 only epoch 1 (boundary included);
    # ≤0.01 admits none → least-bad = lowest utility loss = epoch 1, flagged over the ceiling.
    best = _by_trial(compare.best_epochs(results.evals_table(_three_epoch_trial()), ceiling))["t1"]
    assert (best["epoch"], best["over_ceiling"], best["epochs_evaluated"]) == (epoch, over, 3)
    assert best["log10_fq"] == pytest.approx(math.log10(best["forget_quality"]))


def test_ties_go_to_lower_utility_loss_then_earlier_epoch():
    rows = [_row("t", "npo", 1, 1e-2, 0.06), _row("t", "npo", 2, 1e-2, 0.03), _row("t", "npo", 3, 1e-2, 0.03)]
    assert _by_trial(compare.best_epochs(results.evals_table(rows)))["t"]["epoch"] == 2


def test_worker_seconds_sum_over_rows_times_workers():
    # (0 + 3)·2 + (10 + 2)·2 + (5 + 1)·2 = 6 + 24 + 12 = 42; a missing train time counts as 0.
    rows = [_row("t", "npo", 0, 1e-12, 0.0, train=None, evaluate=3.0, workers=2),
            _row("t", "npo", 1, 1e-4, 0.01, train=10.0, evaluate=2.0, workers=2),
            _row("t", "npo", 2, 1e-3, 0.02, train=5.0, evaluate=1.0, workers=2)]
    assert _by_trial(compare.best_epochs(results.evals_table(rows)))["t"]["worker_seconds"] == pytest.approx(42.0)


def test_references_pass_through_unranked():
    table = results.evals_table(_references() + _three_epoch_trial())
    ranked = compare.rank_trials(compare.best_epochs(table))
    rows = ranked.to_pylist()
    assert [r["method"] for r in rows] == ["npo", "target", "retain"]
    assert [r["reference"] for r in rows] == [False, True, True]
    assert [r["rank"] for r in rows] == [1, None, None]


def test_diverged_trial_ranked_last_with_status_and_running_failed_kept():
    rows = _references() + [
        _row("good", "npo", 1, 1e-3, 0.05),
        _row("late-div", "ga", 1, 1e-5, 0.02),                      # fine at epoch 1 …
        _row("late-div", "ga", 2, NAN, NAN, status="diverged"),    # … then NaN: epoch 1 counts, status says diverged
        _row("div", "ga", 1, NAN, None, status="diverged"),        # never measured → last
        _row("run", "rmu", 1, 1e-4, 0.03, status="running"),
        _row("fail", "rmu", 1, None, None, status="failed"),
    ]
    ranked = _by_trial(compare.rank_trials(compare.best_epochs(results.evals_table(rows))))
    assert set(ranked) == {"good", "late-div", "div", "run", "fail", "target", "retain"}
    # measured points (log10 FQ, loss): good (-3, .05), run (-4, .03), late-div (-5, .02): none dominates → front 0,
    # ordered by FQ; the two unmeasured trials share the next front (1) and rank 4-5 (tie → cheaper first, then id).
    assert [ranked[t]["rank"] for t in ("good", "run", "late-div")] == [1, 2, 3]
    assert {ranked[t]["rank"] for t in ("div", "fail")} == {4, 5}
    assert ranked["div"]["front"] == ranked["fail"]["front"] == 1
    assert (ranked["late-div"]["epoch"], ranked["late-div"]["status"]) == (1, "diverged")
    assert ranked["div"]["status"] == "diverged" and math.isnan(ranked["div"]["log10_fq"])
    assert ranked["run"]["status"] == "running" and ranked["fail"]["status"] == "failed"


# ---------------------------------------------------------------------------------------------
# rank_trials / rank_methods


def _sweep_rows() -> list[dict]:
    # best rows (log10 FQ, loss, worker-seconds (train 10 + eval 2)·workers):
    #   a1 npo  (-2, .05, 12)   front 0        a2 npo (-3, .08, 12) dominated by a1 → front 1
    #   b1 ga   (-2, .05, 24)   identical point to a1, more expensive → front 0, after a1
    #   c1 rmu  (-4, .01, 12)   lowest loss → front 0
    #   d1 ga   (-1, .50, 12)   over the 0.10 ceiling → after every within-ceiling trial, front 2
    return _references() + [
        _row("a1", "npo", 1, 1e-2, 0.05), _row("a2", "npo", 1, 1e-3, 0.08), _row("b1", "ga", 1, 1e-2, 0.05, workers=2),
        _row("c1", "rmu", 1, 1e-4, 0.01), _row("d1", "ga", 1, 1e-1, 0.50),
    ]


def test_rank_trials_orders_by_front_then_fq_then_cost_and_over_ceiling_last():
    ranked = compare.rank_trials(compare.best_epochs(results.evals_table(_sweep_rows())))
    trials = [r for r in ranked.to_pylist() if not r["reference"]]
    assert [(r["trial_id"], r["front"], r["rank"]) for r in trials] == [
        ("a1", 0, 1), ("b1", 0, 2), ("c1", 0, 3), ("a2", 1, 4), ("d1", 2, 5)]
    assert [r["over_ceiling"] for r in trials] == [False, False, False, False, True]
    assert ranked.column_names[:2] == ["rank", "front"]


def test_rank_methods_takes_each_methods_best_trial():
    ranked = compare.rank_trials(compare.best_epochs(results.evals_table(_sweep_rows())))
    methods = [r for r in compare.rank_methods(ranked).to_pylist() if not r["reference"]]
    # npo → a1 (rank 1), ga → b1 (rank 2), rmu → c1 (rank 3): a1 and b1 are the same point (tie, a1 cheaper),
    # c1 has the lowest loss → all on front 0; order by FQ then cost.
    assert [(r["method"], r["trial_id"], r["trial_rank"], r["trials"], r["front"], r["rank"]) for r in methods] == [
        ("npo", "a1", 1, 2, 0, 1), ("ga", "b1", 2, 2, 0, 2), ("rmu", "c1", 3, 1, 0, 3)]


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError, match="utility_ceiling"):
        compare.best_epochs(results.evals_table(_sweep_rows()), math.nan)
    with pytest.raises(ValueError, match="best_epochs"):
        compare.rank_trials(results.evals_table(_sweep_rows()))
    with pytest.raises(ValueError, match="at least one"):
        compare.compare_runs([])


# ---------------------------------------------------------------------------------------------
# compare_runs, the report and the terminal table


def _write_run(run_dir, rows) -> None:
    for row in rows:
        results.write_evals(run_dir, [row], row["trial_id"], row["epoch"])


def test_compare_runs_writes_ranking_and_report(tmp_path):
    run_dir = tmp_path / "run-a"
    _write_run(run_dir, _sweep_rows())
    with pytest.warns(UserWarning, match="num_workers"):  # b1 ran on 2 workers, the others on 1
        comparison = compare.compare_runs([str(run_dir)])
    assert any("num_workers" in w for w in comparison.warnings)
    assert comparison.ranking_path == run_dir / "ranking.parquet"
    assert pq.read_table(comparison.ranking_path).equals(comparison.ranked)
    assert comparison.run_ids == ["run-a"]

    markdown = comparison.report_paths["markdown"].read_text()
    assert "| rank | front | method | params |" in markdown
    assert "| 1 | 0 | npo |" in markdown and "| ref | - | target |" in markdown
    assert "num_workers" in markdown
    page = comparison.report_paths["html"].read_text()
    marker = '<img alt="forget quality vs utility loss" src="data:image/png;base64,'
    assert marker in page
    encoded = page.split(marker, 1)[1].split('"', 1)[0]
    assert base64.b64decode(encoded)[:8] == b"\x89PNG\r\n\x1a\n"
    for kind in ("scatter", "curves"):
        assert comparison.report_paths[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert comparison.report_paths[kind].parent == run_dir / "report"


def test_compare_runs_reads_parquet_files_and_several_runs(tmp_path):
    first = tmp_path / "a.parquet"
    results.write_table_atomic(results.evals_table(_references("run-a") + [_row("x", "npo", 1, 1e-2, 0.05, run_id="run-a")]), first)
    second = tmp_path / "run-b"
    _write_run(second, _references("run-b") + [_row("x", "npo", 1, 1e-3, 0.02, run_id="run-b", batch=16)])
    out = tmp_path / "cmp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        comparison = compare.compare_runs([first, second], out_dir=out)
    # the same trial name in two runs stays two trials; both points are non-dominated (one has higher FQ,
    # the other lower loss), so run-a's (higher FQ) ranks first.
    trials = [(r["run_id"], r["rank"]) for r in comparison.ranked.to_pylist() if not r["reference"]]
    assert trials == [("run-a", 1), ("run-b", 2)]
    assert any("effective_batch (8, 16)" in w for w in comparison.warnings)
    assert (out / "ranking.parquet").exists() and (out / "report" / "report.html").exists()
    assert "| run |" in comparison.report_paths["markdown"].read_text()
    with pytest.raises(ValueError, match="does not exist"):
        compare.compare_runs([tmp_path / "missing"])


def test_format_table_marks_references_and_over_ceiling():
    ranked = compare.rank_trials(compare.best_epochs(results.evals_table(_sweep_rows())))
    lines = compare.format_table(ranked).splitlines()
    assert lines[0].split()[:4] == ["rank", "front", "method", "params"]
    by_method = {line.split()[2]: line for line in lines[2:] if len(line.split()) > 3 and line.split()[0] == "ref"}
    assert set(by_method) == {"target", "retain"}
    assert "1.00e-12" in by_method["target"]  # FQ in scientific notation
    d1 = next(line for line in lines if '"trial":"d1"' in line)
    assert d1.split()[0] == "5*" and "1.00e-01" in d1 and "0.500" in d1
    assert any(line.startswith("*:") for line in lines)


# ---------------------------------------------------------------------------------------------
# Query examples for the README: its code blocks, as written, run against a run directory


README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_block(language: str, containing: str) -> str:
    """The one fenced ``language`` block of README.md that contains ``containing``, exactly as written."""
    blocks = [b for b in re.findall(rf"```{language}\n(.*?)```", README, re.S) if containing in b]
    assert len(blocks) == 1, f"README.md: {len(blocks)} ```{language} blocks contain {containing!r}"
    return blocks[0]


def _quickstart_run(tmp_path, monkeypatch, rows) -> None:
    """The README's queries read ``runs/quickstart`` relative to the working directory: write it there."""
    _write_run(tmp_path / "runs" / "quickstart", rows)
    monkeypatch.chdir(tmp_path)


def _assert_best_per_method(rows: list[tuple], expected: list[tuple], fq_column: int) -> None:
    # ga and npo tie on FQ (1e-2) and the README orders by FQ alone: their order is free, the FQ order is not.
    assert sorted(rows) == sorted(expected)
    assert [row[fq_column] for row in rows] == sorted((row[fq_column] for row in expected), reverse=True)


def test_readme_duckdb_query_over_evals_parquet(tmp_path, monkeypatch):
    import duckdb

    _quickstart_run(tmp_path, monkeypatch, _sweep_rows() + [_row("a1", "npo", 2, 0.5, 0.30)])
    # Best epoch per method under the 0.10 ceiling, by hand: npo → a1 epoch 1 (1e-2; its epoch 2 is over the
    # ceiling), ga → b1 (1e-2; d1 is over), rmu → c1 (1e-4); target/retain excluded.
    rows = duckdb.sql(readme_block("sql", "read_parquet('runs/quickstart/evals/*.parquet'")).fetchall()
    _assert_best_per_method(rows, [("ga", "b1", 1, 1e-2, 0.05), ("npo", "a1", 1, 1e-2, 0.05),
                                   ("rmu", "c1", 1, 1e-4, 0.01)], fq_column=3)


def test_readme_polars_snippet_over_evals_parquet(tmp_path, monkeypatch):
    import polars as pl

    _quickstart_run(tmp_path, monkeypatch, _sweep_rows())
    # The snippet is statements then one expression (the frame it shows): run the first, evaluate the last.
    *statements, last = ast.parse(readme_block("python", "import polars as pl")).body
    assert isinstance(last, ast.Expr)
    namespace: dict = {}
    exec(compile(ast.Module(statements, type_ignores=[]), "README.md", "exec"), namespace)
    frame = eval(compile(ast.Expression(last.value), "README.md", "eval"), namespace)
    assert isinstance(frame, pl.DataFrame)
    # The highest FQ per method under the ceiling (by hand as above: ga 1e-2, npo 1e-2, rmu 1e-4).
    _assert_best_per_method(frame.rows(), [("ga", 1e-2), ("npo", 1e-2), ("rmu", 1e-4)], fq_column=1)


# ---------------------------------------------------------------------------------------------
# MUSE: VerbMem ↓ in place of FQ ↑, utility from KnowMem on retain questions


def _muse_row(trial: str, method: str, epoch: int, verbmem: float | None, knowmem: float | None, **extra) -> dict:
    # No forget quality (MUSE has no truth ratio); utility columns left empty for compare to derive.
    return _row(trial, method, epoch, None, None, verbmem_forget=verbmem, knowmem_retain=knowmem, **extra)


def _muse_rows() -> list[dict]:
    # Target's KnowMem-retain 0.5, so utility loss = 1 − KnowMem/0.5. Per trial (VerbMem, KnowMem → loss):
    #   ga   e1 (.50, .48 → .04)  e2 (.10, .30 → .40 over 0.10)  → e1 is its best within the ceiling
    #   npo  e1 (.30, .46 → .08)  e2 (.30, .47 → .06)            → same VerbMem: lower loss wins → e2
    #   gd   e1 (.60, .49 → .02)
    #   sim  e1 (.55, .47 → .06)  dominated by npo e2 (lower VerbMem, same loss) → front 1
    #   kl   e1 (.05, .40 → .20)  only over the ceiling → least-bad, after every within-ceiling trial
    #   div  diverged, nothing measured → last
    # Within-ceiling points (−VerbMem ↑, loss ↓): npo (−.3, .06), ga (−.5, .04), gd (−.6, .02): none dominates
    # another → front 0, ordered by VerbMem: npo 1, ga 2, gd 3; sim front 1 rank 4; kl front 2 rank 5; div rank 6.
    return [
        _muse_row("target", "target", 0, 0.90, 0.50), _muse_row("retain", "retain", 0, 0.20, 0.45),
        _muse_row("ga", "ga", 1, 0.50, 0.48), _muse_row("ga", "ga", 2, 0.10, 0.30),
        _muse_row("npo", "npo", 1, 0.30, 0.46), _muse_row("npo", "npo", 2, 0.30, 0.47),
        _muse_row("gd", "graddiff", 1, 0.60, 0.49), _muse_row("sim", "simnpo", 1, 0.55, 0.47),
        _muse_row("kl", "kl", 1, 0.05, 0.40), _muse_row("div", "ga", 1, None, None, status="diverged"),
    ]


def test_muse_rows_rank_on_verbmem_and_knowmem_utility_loss():
    table = results.evals_table(_muse_rows())
    assert compare.benchmark_kind(table) == "muse"
    ranked = _by_trial(compare.rank_trials(compare.best_epochs(table)))
    assert {t: ranked[t]["rank"] for t in ("npo", "ga", "gd", "sim", "kl", "div")} == {
        "npo": 1, "ga": 2, "gd": 3, "sim": 4, "kl": 5, "div": 6}
    assert {t: ranked[t]["front"] for t in ("npo", "ga", "gd", "sim", "kl", "div")} == {
        "npo": 0, "ga": 0, "gd": 0, "sim": 1, "kl": 2, "div": 3}
    assert (ranked["ga"]["epoch"], ranked["npo"]["epoch"], ranked["kl"]["over_ceiling"]) == (1, 2, True)
    assert ranked["npo"]["model_utility"] == 0.47 and ranked["npo"]["utility_loss"] == pytest.approx(1 - 0.47 / 0.5)
    assert ranked["retain"]["utility_loss"] == pytest.approx(0.1) and ranked["target"]["utility_loss"] == 0.0
    assert math.isnan(ranked["npo"]["log10_fq"]) and ranked["retain"]["rank"] is None
    methods = [r["method"] for r in compare.rank_methods(compare.rank_trials(compare.best_epochs(table))).to_pylist()]
    assert methods == ["npo", "ga", "graddiff", "simnpo", "kl", "target", "retain"]
    headers, _ = report.table_cells(compare.rank_trials(compare.best_epochs(table)))
    assert "VerbMem" in headers and "FQ" not in headers


def test_muse_utility_keeps_values_the_evaluation_wrote():
    # A row that already carries utility numbers (the worker computes them) is left as it is.
    rows = compare.muse_utility([dict(_muse_row("target", "target", 0, 0.9, 0.5)),
                                 dict(_muse_row("t", "ga", 1, 0.5, 0.25), model_utility=0.3, utility_loss=0.7)])
    assert (rows[1]["model_utility"], rows[1]["utility_loss"]) == (0.3, 0.7)
    assert (rows[0]["model_utility"], rows[0]["utility_loss"]) == (0.5, 0.0)


def test_tofu_tables_stay_tofu_even_with_verbmem():
    # The embedded TOFU benchmark also measures VerbMem (its text corpus): FQ present → ranked on FQ.
    rows = [dict(r, verbmem_forget=0.5) for r in _sweep_rows()]
    assert compare.benchmark_kind(results.evals_table(rows)) == "tofu"
    assert compare.benchmark_kind(results.evals_table(_sweep_rows())) == "tofu"
    with_verbmem = compare.rank_trials(compare.best_epochs(results.evals_table(rows)))
    plain = compare.rank_trials(compare.best_epochs(results.evals_table(_sweep_rows())))
    assert with_verbmem.column("trial_id").to_pylist() == plain.column("trial_id").to_pylist()


def test_muse_figures_plot_verbmem_where_tofu_ones_plot_fq(tmp_path, monkeypatch):
    """A MUSE run has no FQ: its scatter and learning curves show VerbMem (linear axis) instead."""
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig) or path)
    table = results.evals_table(_muse_rows())
    ranked = compare.rank_trials(compare.best_epochs(table))
    report.plot_fq_vs_utility_loss(ranked, 0.1, tmp_path / "scatter.png")
    report.plot_learning_curves(table, tmp_path / "curves.png")
    scatter = figures[0].axes[0]
    plotted = sorted(round(float(y), 6) for points in scatter.collections for _, y in points.get_offsets())
    measured = [r for r in ranked.to_pylist() if r["verbmem_forget"] is not None and not math.isnan(r["utility_loss"])]
    assert plotted == sorted(round(r["verbmem_forget"], 6) for r in measured) and len(plotted) == 7
    assert scatter.get_yscale() == "linear" and "VerbMem" in scatter.get_ylabel()
    curves = {ax.get_title(): ax for ax in figures[1].axes}
    ga_lines = [line for line in curves["ga: VerbMem"].get_lines() if not line.get_label().startswith(("target", "retain"))]
    assert (0.5, 0.1) in [tuple(line.get_ydata()) for line in ga_lines]  # trial "ga": epochs 1, 2
    figures.clear()
    report.plot_fq_vs_utility_loss(compare.rank_trials(compare.best_epochs(results.evals_table(_sweep_rows()))),
                                   0.1, tmp_path / "tofu.png")
    assert figures[0].axes[0].get_yscale() == "log" and "forget quality" in figures[0].axes[0].get_ylabel()


def test_probe_rows_do_not_replace_a_trials_epoch_and_the_robust_ranking_uses_the_worst_probe():
    # Two trials, both measured at epoch 2 within the ceiling. "fragile" forgets more (FQ 1e-2 vs 1e-4) but
    # its forgetting does not survive: after int4 its FQ is 1e-9 (relearn 1e-6); "sturdy" keeps 1e-5.
    rows = _references() + [
        _row("fragile", "npo", 1, 1e-6, 0.05), _row("fragile", "npo", 2, 1e-2, 0.05),
        _row("fragile", "npo", 2, 1e-6, 0.06, probe="relearn"), _row("fragile", "npo", 2, 1e-9, 0.05, probe="int4"),
        _row("sturdy", "ga", 1, 1e-5, 0.05), _row("sturdy", "ga", 2, 1e-4, 0.05),
        _row("sturdy", "ga", 2, 1e-5, 0.05, probe="int4"),
    ]
    plain = compare.compare_evals(results.evals_table(rows)).ranked.to_pylist()
    by_trial = {r["trial_id"]: r for r in plain}
    # the probe rows at epoch 2 leave each trial's own epoch-2 row as its representative
    assert by_trial["fragile"]["forget_quality"] == 1e-2 and by_trial["fragile"]["epoch"] == 2
    assert (by_trial["fragile"]["worst_probe"], by_trial["fragile"]["probe_forget_quality"]) == ("int4", 1e-9)
    assert by_trial["fragile"]["probe_forget_score"] == pytest.approx(-9.0)
    assert (by_trial["sturdy"]["worst_probe"], by_trial["sturdy"]["probe_forget_quality"]) == ("int4", 1e-5)
    assert [r["trial_id"] for r in plain if not r["reference"]] == ["fragile", "sturdy"]
    robust = compare.compare_evals(results.evals_table(rows), robust=True).ranked.to_pylist()
    assert [r["trial_id"] for r in robust if not r["reference"]] == ["sturdy", "fragile"]
    headers, cells = report.table_cells(compare.compare_evals(results.evals_table(rows)).ranked)
    assert headers[-1] == "FQ after worst probe" and cells[0][-1] == "1.00e-09 (int4)"
