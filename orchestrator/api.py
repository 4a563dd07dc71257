"""The Python API: ``run(spec)`` and ``resume(run_dir)``; the CLI is a thin layer over these.

Order matters: everything that can be wrong with the input is checked before Ray is started and before
anything is written; then the run directory, Ray, prepare, the sweep and the comparison, in that order.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from orchestrator.errors import SpecError
from orchestrator.provenance import provenance
from orchestrator.spec import JobSpec, load_spec

if TYPE_CHECKING:
    import pyarrow as pa

@dataclass
class RunResult:
    """A finished (or resumed) sweep: where it lives and what it measured."""

    run_dir: Path
    evals: pa.Table
    samples: pa.Table
    ranking: pa.Table | None
    report: Path | None
    summary: str

    def best_trials(self, n: int = 5) -> list[dict[str, Any]]:
        """The top of the ranking (reference rows excluded), as dicts."""
        from orchestrator.results import REFERENCE_METHODS

        if self.ranking is None:
            return []
        rows = [r for r in self.ranking.to_pylist() if r.get("method") not in REFERENCE_METHODS]
        return rows[:n]


# ---------------------------------------------------------------- checks before Ray
def preflight(spec: JobSpec) -> None:
    """Input checks that need no cluster: model references and the benchmark's splits and rows."""
    from orchestrator.data import check_muse_splits, check_splits, load_benchmark
    from orchestrator.data.validation import UTILITY_SPLITS
    from orchestrator.errors import MissingSplit
    from orchestrator.model_sources import check_reference
    from orchestrator.prepare import benchmark_config
    from orchestrator.sweep import grid_configs

    m = spec.model
    for field, reference in (("model.target", None if m.uses_embedded_model or m.base else m.target),
                             ("model.retain", m.retain), ("model.tokenizer", m.tokenizer), ("model.base", m.base)):
        if reference:
            check_reference(reference, field)
    bench = benchmark_config(spec)
    b = spec.benchmark
    try:
        data = load_benchmark(bench["source"], **bench["generator"])
    except MissingSplit as err:  # name the spec field that asked for it
        roles = {b.forget_split: "benchmark.forget_split", b.retain_split: "benchmark.retain_split",
                 b.holdout_split: "benchmark.holdout_split"}
        field = roles.get(err.split, "evaluation.utility_sets" if err.split in UTILITY_SPLITS else "benchmark.source")
        raise MissingSplit(f"field '{field}': {err}", err.split) from None
    if b.kind == "muse":
        check_muse_splits(data, b.forget_split, b.retain_split, b.holdout_split)
    else:
        check_splits(data, b.forget_split, b.retain_split, b.holdout_split, spec.evaluation.utility_sets)
    if m.base and b.kind == "tofu" and not data.get("full"):
        raise SpecError(f"field 'model.base': the target is the base fine-tuned on split 'full', which {b.source!r} lacks")
    if spec.sweep is not None and spec.sweep.search == "grid":
        for i, entry in enumerate(spec.sweep.methods):
            grid_configs(entry, f"sweep.methods[{i}]")
    if spec.ray.address is None and not os.environ.get("RAY_ADDRESS"):
        cpus = spec.ray.num_cpus or os.cpu_count() or 1
        check_capacity(spec, cpus, 0.0 if not spec.scaling.use_gpu else _local_gpus())


def check_capacity(spec: JobSpec, cpus: float, gpus: float) -> None:
    from orchestrator.sweep import gang_fits

    if gang_fits(spec, cpus, gpus) < 1:
        s = spec.scaling
        need = f"{s.num_workers} × {s.cpus_per_worker} CPU" + (f" and {s.num_workers} GPU" if s.use_gpu else "")
        raise SpecError(f"field 'scaling.num_workers': a trial needs {need}, the cluster has {cpus:g} CPU"
                        + (f" and {gpus:g} GPU" if s.use_gpu else "") + ": it could never be scheduled")


def check_placement(spec: JobSpec) -> None:
    """The placement strategy and the drivers' node against the connected cluster's alive nodes."""
    import ray

    from orchestrator.sweep import placement_problem

    problem = placement_problem(spec, [node["Resources"] for node in ray.nodes() if node["Alive"]])
    if problem:
        raise SpecError(problem)


def _local_gpus() -> float:
    import torch

    return float(torch.cuda.device_count())


# ---------------------------------------------------------------- Ray
# Each background actor of a Train run costs a few % of a core; on small clusters that is real time.
RAY_ENV_DEFAULTS = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # a spot-preemption poller; clusters that need it set 1
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # worker prints reached the driver twice with it on
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "5",
    "RAY_DEDUP_LOGS": "1",
    "RAY_AIR_NEW_OUTPUT": "0",  # Tune's CLIReporter with our columns (method, epoch, FQ, MU, utility loss)
    # Epochs without an evaluation report no score (not a stand-in): Tune's schedulers and searchers skip them.
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
}


def init_ray(spec: JobSpec, address: str | None, run_dir: Path | None = None) -> None:
    import ray
    from ray.job_config import JobConfig

    from orchestrator.telemetry import job_metadata

    if ray.is_initialized():
        return
    address = address or spec.ray.address
    for name, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    job_config = JobConfig(metadata=job_metadata(spec.name, run_dir))  # the dashboard's Jobs page and `ray list jobs`
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=True, job_config=job_config)
        return
    start_local_ray(spec.ray.num_cpus, spec.ray.dashboard_host, log_to_driver=True, job_config=job_config,
                    _metrics_export_port=spec.ray.metrics_export_port)


def start_local_ray(num_cpus: int | None, dashboard_host: str = "127.0.0.1", **init_kwargs: Any) -> str:
    """Start a local Ray cluster with its dashboard, every process of it knowing that dashboard's address.

    Why: Tune stops a trial (ASHA, or any ASHA trial at max_t) by killing its driver, and with it the Ray
    Train controller; the gang's placement group is then freed only by Train's PlacementGroupCleaner, which
    asks the dashboard's state API whether the controller is alive. Without RAY_API_SERVER_ADDRESS the
    cleaner auto-detects "the" Ray on the machine: with several running it gives up (the gang's CPUs stay
    reserved and the next trial waits forever). So the port is chosen here and the address is in the
    environment while the raylet starts (its workers inherit it), then the caller's environment is restored.
    Returns the dashboard URL.
    """
    import socket

    import ray

    url_host = "127.0.0.1" if dashboard_host in ("0.0.0.0", "::", "localhost") else dashboard_host
    with socket.socket() as probe:
        probe.bind((url_host, 0))
        port = probe.getsockname()[1]
    url = f"http://{url_host}:{port}"
    previous = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = url
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host=dashboard_host, dashboard_port=port,
                 **init_kwargs)
    finally:
        if previous is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS")
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = previous
    return url


def cluster_capacity() -> tuple[float, float]:
    import ray

    resources = ray.cluster_resources()
    return resources.get("CPU", 0.0), resources.get("GPU", 0.0)


def ray_fit(run_dir: Path) -> Callable[[list[list[dict[str, Any]]], int, float], None]:
    """How prepare runs the worker loop: one TorchTrainer gang per task list, the gangs concurrently."""

    def fit_one(tasks: list[dict[str, Any]], num_workers: int, cpus: float) -> None:
        from ray.train import LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from orchestrator.console import TRAIN_CONSOLE_LEVEL
        from orchestrator.sweep import worker_resources
        from orchestrator.worker import train_loop_per_worker

        use_gpu = bool(tasks[0]["scaling"]["use_gpu"])
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config={"tasks": tasks},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker=worker_resources(cpus, use_gpu)),
            run_config=RunConfig(name=f"prepare-{uuid.uuid4().hex[:8]}", storage_path=str(run_dir / "prepare"),
                                 logging_config=LoggingConfig(TRAIN_CONSOLE_LEVEL)),
        )
        trainer.fit()

    def fit(gangs: list[list[dict[str, Any]]], num_workers: int, cpus: float) -> None:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=len(gangs)) as pool:
            for future in [pool.submit(fit_one, tasks, num_workers, cpus) for tasks in gangs]:
                future.result()

    return fit


# ---------------------------------------------------------------- run / resume
def default_run_dir(spec: JobSpec) -> Path:
    return Path("runs") / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(spec: JobSpec | str | os.PathLike, run_dir: str | os.PathLike | None = None, address: str | None = None,
        overrides: list[str] | None = None, log: Callable[[str], None] = print) -> RunResult:
    """Validate, prepare, sweep and compare; return the run's tables and ranking."""
    from orchestrator.prepare import prepare

    if not isinstance(spec, JobSpec):
        spec = load_spec(spec, overrides)
    if spec.sweep is None:
        raise SpecError("field 'sweep': unlearn run needs one (the methods to search); `unlearn eval` scores "
                        "models without a sweep")
    preflight(spec)
    run_dir = Path(run_dir or spec.run_dir or default_run_dir(spec)).resolve()
    if (run_dir / "run.json").exists():
        raise SpecError(f"--run-dir {run_dir}: already holds a run; use `unlearn resume {run_dir}`")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    init_ray(spec, address, run_dir)
    from orchestrator.sweep import gang_fits

    cpus, gpus = cluster_capacity()
    check_capacity(spec, cpus, gpus)
    check_placement(spec)
    run_id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
    log(f"run {run_id}: {run_dir}")
    if spec.forget_axis() == "forget_prob":
        log("warning: no retain model (model.retain): forget quality and privleak are not measured; trials are "
            "searched and ranked on the forget-answer probability instead")
    prepared = prepare(spec, ray_fit(run_dir), log)
    log(f"prepare: done in {prepared.seconds:.0f} s")
    check_target_utility(spec, prepared.target_model_utility)
    base = base_trial_config(spec, run_dir, run_id, prepared)
    write_reference_rows(run_dir, base, prepared)
    max_concurrent = spec.sweep.max_concurrent or max(1, gang_fits(spec, cpus, gpus))
    state = {"run_id": run_id, "base_config": base, "max_concurrent": max_concurrent}
    (run_dir / "run.json").write_text(json.dumps(state, indent=1))
    return _sweep_and_compare(spec, run_dir, state, log, restore=False)


def resume(run_dir: str | os.PathLike, address: str | None = None, log: Callable[[str], None] = print) -> RunResult:
    """Continue a sweep whose driver stopped: finished trials are kept, unfinished ones continue."""
    from orchestrator.spec import parse_spec, read_yaml

    run_dir = Path(run_dir).resolve()
    if not (run_dir / "run.json").exists():
        raise SpecError(f"{run_dir}: not a run directory (no run.json); start it with `unlearn run`")
    spec = parse_spec(read_yaml(run_dir / "spec.yaml"), str(run_dir / "spec.yaml"))
    state = json.loads((run_dir / "run.json").read_text())
    init_ray(spec, address, run_dir)
    log(f"resuming run {state['run_id']}: {run_dir}")
    return _sweep_and_compare(spec, run_dir, state, log, restore=True)


def _sweep_and_compare(spec: JobSpec, run_dir: Path, state: dict[str, Any], log, restore: bool) -> RunResult:
    from orchestrator.sweep import build_tuner, live_gangs, restore_tuner, wait_for_gangs_to_end

    start, gangs_before = time.perf_counter(), live_gangs()
    if restore and (run_dir / "tune").exists():
        tuner = restore_tuner(spec, run_dir, state["base_config"])
    else:
        tuner = build_tuner(spec, run_dir, state["base_config"], state["max_concurrent"])
    grid = tuner.fit()
    failed = sum(1 for result in grid if result.error is not None)
    log(f"sweep: {len(grid)} trials in {time.perf_counter() - start:.0f} s ({failed} failed)")
    wait_for_gangs_to_end(gangs_before, log)
    finalize_statuses(run_dir, state, [(Path(r.path).name, r.error is not None) for r in grid])
    return summarize(run_dir, spec.utility_ceiling, log)


def finalize_statuses(run_dir: Path, state: dict[str, Any], trials: list[tuple[str, bool]]) -> None:
    """A trial that ended while its last row still says "running" was stopped (ASHA) or failed; one
    that failed before any evaluation gets a row of its own, so the comparison never drops it."""
    from orchestrator.results import read_evals, write_evals

    evals = read_evals(run_dir)
    last_rows: dict[str, dict[str, Any]] = {}
    for row in evals.to_pylist():
        if row["trial_id"] not in last_rows or row["epoch"] >= last_rows[row["trial_id"]]["epoch"]:
            last_rows[row["trial_id"]] = row
    base = state["base_config"]
    for trial_id, errored in trials:
        row = last_rows.get(trial_id)
        if row is None and errored:
            method = trial_id.rsplit("_", 2)[0]
            row = reference_row(base, {"trial_id": trial_id, "method": method, "epoch": 0, "params": "{}"})
            write_evals(run_dir, [dict(row, status="failed", num_workers=base["scaling"]["num_workers"])], trial_id, 0)
        elif row is not None and row["status"] == "running":
            row = {k: v for k, v in row.items() if v is not None}
            write_evals(run_dir, [dict(row, status="failed" if errored else "stopped")], trial_id, row["epoch"])


def summarize(run_dir: Path, utility_ceiling: float, log: Callable[[str], None] = print) -> RunResult:
    from orchestrator.compare import compare_runs, format_table
    from orchestrator.results import read_evals, read_samples

    comparison = compare_runs([str(run_dir)], str(run_dir), utility_ceiling=utility_ceiling)
    log(format_table(comparison.ranked))
    report = comparison.report_paths.get("html")
    summary = f"tables: {run_dir / 'evals'} · ranking: {comparison.ranking_path} · report: {report}"
    log(summary)
    return RunResult(run_dir, read_evals(run_dir), read_samples(run_dir), comparison.ranked,
                     Path(report) if report else None, summary)


def base_trial_config(spec: JobSpec, run_dir: Path, run_id: str, prepared) -> dict[str, Any]:
    from orchestrator.prepare import benchmark_config, evaluation_config, model_config

    return {
        "run_dir": str(run_dir), "run_id": run_id, "seed": spec.seed, "spec_hash": spec.spec_hash(),
        **provenance(),
        "model": model_config(spec, prepared.model_path, prepared.tokenizer_path),
        "training": spec.training.model_dump(), "scaling": spec.scaling.model_dump(),
        "benchmark": prepared.benchmark or benchmark_config(spec), "evaluation": evaluation_config(spec),
        "references": {"retain_stats": prepared.retain_stats, "target_model_utility": prepared.target_model_utility,
                       "alternates": prepared.alternates},
        "utility_weight": spec.sweep.utility_weight if spec.sweep else None,
        "utility_ceiling": spec.utility_ceiling, "robustness": spec.robustness.model_dump(),
        "threads_per_worker": spec.scaling.threads_per_worker,
    }


def reference_row(base: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """A target/retain evals row with the run's identity and provenance columns."""
    from orchestrator.results import EVALS_SCHEMA

    out = {k: v for k, v in row.items() if k in EVALS_SCHEMA.names}
    out.update(run_id=base["run_id"], step=0, seed=base["seed"], spec_hash=base["spec_hash"],
               git_sha=base["git_sha"], versions=base["versions"], num_workers=1,
               zero_stage=base["scaling"]["zero_stage"], benchmark=base["benchmark"]["kind"],
               truth_ratio_aggregator=base["evaluation"]["truth_ratio_aggregator"])
    return out


def write_reference_rows(run_dir: Path, base: dict[str, Any], prepared) -> None:
    """The reference models' evals rows (epoch 0) and their per-example samples into the run's tables."""
    from orchestrator.results import copy_reference_samples, write_evals

    for row in prepared.reference_rows:
        write_evals(run_dir, [reference_row(base, row)], row["trial_id"], 0)
        if row["method"] in prepared.evaluation_files:
            copy_reference_samples(prepared.evaluation_files[row["method"]], run_dir, base["run_id"], row["trial_id"])


def check_target_utility(spec: JobSpec, target_model_utility: float | None) -> None:
    """Utility loss is 1 − MU/MU(target): with a target utility of 0 no trial's could be measured, and a sweep
    on it would optimise nothing (known only once prepare has scored the target)."""
    needs = spec.sweep is not None and (spec.sweep.metric in ("score", "model_utility") or spec.sweep.multi_objective)
    if needs and target_model_utility == 0:
        raise SpecError(f"field 'model.target': the target's model utility is 0, so utility loss (1 − MU/MU_target) "
                        f"is undefined and sweep.metric {spec.sweep.metric!r} cannot be computed")


def prepare_only(spec: JobSpec, address: str | None = None, log: Callable[[str], None] = print):
    """The prepare stage alone (``unlearn prepare``): build or reuse the reference models."""
    from orchestrator.prepare import prepare

    init_ray(spec, address)
    workdir = Path(spec.prepare.cache_dir).expanduser().resolve() / "ray"
    return prepare(spec, ray_fit(workdir), log)


def summarize_sources(sources: list[str], out: str | None, utility_ceiling: float | None,
                      log: Callable[[str], None] = print, robust: bool = False):
    """``unlearn compare``: rank one or several runs (or Parquet files) and write the report."""
    from orchestrator.compare import compare_runs, format_table

    ceiling = utility_ceiling
    if ceiling is None:
        spec_file = Path(sources[0]) / "spec.yaml"
        ceiling = yaml.safe_load(spec_file.read_text()).get("utility_ceiling", 0.10) if spec_file.exists() else 0.10
    for source in sources:
        if not Path(source).exists():
            raise SpecError(f"compare: {source}: no such run directory or Parquet file")
    comparison = compare_runs(list(sources), out, utility_ceiling=ceiling, robust=robust)
    log(format_table(comparison.methods))
    log(format_table(comparison.ranked))
    log(f"ranking: {comparison.ranking_path} · report: {comparison.report_paths.get('html')}")
    return comparison
