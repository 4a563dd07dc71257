"""P5 search efficiency: ASHA and Optuna against the full grid, real Ray Tune sweeps on cached models."""
from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import Any, Sequence

from orchestrator.bench.processes import start_ray
from orchestrator.bench.sizes import Bench, bench_spec
from orchestrator.bench.table import BenchRow, measured
from orchestrator.results import REFERENCE_METHODS


def search_cost(rows: Sequence[dict[str, Any]], utility_weight: float) -> tuple[float, float | None, int]:
    """(worker-seconds, best score, trials) of a sweep's evals rows (reference rows excluded).

    A trial's ``train_seconds`` is cumulative over its epochs and ``eval_seconds`` is per evaluation,
    so a trial costs (its last train_seconds + the sum of its eval_seconds) × num_workers.
    """
    from orchestrator.scores import score

    by_trial: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        if row.get("method") in REFERENCE_METHODS:
            continue
        by_trial.setdefault(row["trial_id"], {})[int(row["epoch"])] = row
    worker_seconds, best = 0.0, None
    for epochs in by_trial.values():
        train = max(float(r.get("train_seconds") or 0.0) for r in epochs.values())
        evaluation = sum(float(r.get("eval_seconds") or 0.0) for r in epochs.values())
        workers = max(int(r.get("num_workers") or 1) for r in epochs.values())
        worker_seconds += (train + evaluation) * workers
        for r in epochs.values():
            value = score(r, utility_weight)
            if value is not None and (best is None or value > best):
                best = value
    return worker_seconds, best, len(by_trial)


def measure_search(bench: Bench) -> list[BenchRow]:
    """P5: the full grid vs ASHA (same grid) vs Optuna (half as many trials) on one GA lr space."""
    grid = list(bench.size.lr_grid)
    methods = [{"name": "ga", "space": {"lr": {"grid": grid}}}]
    g_seconds, g_best, g_trials, g_wall = run_sweep(bench, "grid", {"methods": methods})
    rows = []
    searches = [("asha", "ASHA", {"methods": methods, "scheduler": "asha", "grace_period": 1, "reduction_factor": 2})]
    if bench.size.optuna:
        searches.append(("optuna", "Optuna", {"methods": methods, "search": "optuna",
                                              "num_samples": max(1, math.ceil(len(grid) / 2))}))
    for name, label, sweep in searches:
        try:
            seconds, best, trials, wall = run_sweep(bench, name, sweep)
        except Exception as error:  # noqa: BLE001 - one search failing leaves the other's rows
            reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
            bench.log(f"P5: {name}: FAILED: {reason}")
            rows.append(measured("P5 search", f"{label}: FAILED: {reason}", None, ""))
            continue
        rows += [
            measured("P5 search", f"best score, {label} ({trials} trials; score = log10 FQ − 10·max(0, utility loss))",
                     best, "score", f"grid ({g_trials} trials)", g_best, comparable=False),
            measured("P5 search", f"worker-seconds (train + eval) × workers, {label}", seconds, "worker·s", "grid", g_seconds),
            measured("P5 search", f"sweep wall time, {label}", wall, "s", "grid", g_wall),
        ]
    return rows


def run_sweep(bench: Bench, name: str, sweep: dict[str, Any]) -> tuple[float, float | None, int, float]:
    """One real sweep through ``api.run`` (prepare is cached): worker-seconds, best score, trials, wall s."""
    from orchestrator.api import run
    from orchestrator.spec import parse_spec

    spec = parse_spec(bench_spec(bench.size, bench.spec.prepare.cache_dir, **sweep), f"<bench {name}>")
    bench.log(f"P5: {name} sweep over GA lr {list(bench.size.lr_grid)} ({spec.training.epochs} epochs per trial; "
              f"Tune's output in {bench.work / f'p5-{name}.log'})")
    start_ray(bench.work / "ray")
    outcome: dict[str, Any] = {}

    def sweep_thread() -> None:
        try:
            with open(bench.work / f"p5-{name}.log", "a") as out, contextlib.redirect_stdout(out):
                outcome["result"] = run(spec, run_dir=bench.work / f"p5-{name}", log=lambda line: None)
        except BaseException as error:  # noqa: BLE001 - handed to the caller below
            outcome["error"] = error

    start = time.perf_counter()
    thread = threading.Thread(target=sweep_thread, daemon=True)
    thread.start()
    thread.join(bench.size.sweep_timeout)
    wall = time.perf_counter() - start
    if thread.is_alive():  # a hung sweep: take Ray down under it, so the bench still finishes
        import ray

        ray.shutdown()
        thread.join(60)
        raise TimeoutError(f"{name} sweep still running after {bench.size.sweep_timeout:.0f} s; Ray shut down")
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    worker_seconds, best, trials = search_cost(result.evals.to_pylist(), spec.sweep.utility_weight)
    bench.log(f"P5: {name}: {trials} trials, best score {best}, {worker_seconds:.1f} worker-s, {wall:.0f} s wall")
    return worker_seconds, best, trials, wall
