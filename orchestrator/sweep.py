"""The sweep: Ray Tune over methods × hyperparameters; each trial drives a Ray Train gang.

Search-space construction is pure (``trial_space``, ``grid_configs``); only ``build_tuner`` and
``driver`` touch Tune and Train. Ray Train V2 refuses ``Tuner(trainer)``: each trial runs ``driver``,
which builds and fits a TorchTrainer and forwards its reports with ``TuneReportCallback``.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from methods import describe
from orchestrator.console import TRAIN_CONSOLE_LEVEL
from orchestrator.errors import SweepError
from orchestrator.spec import JobSpec
from orchestrator.spec_sweep import TRAINER_KEYS, MethodEntry

DRIVER_CPU = 0.01  # a Tune trial that only drives a TorchTrainer (0 is refused by Ray 2.60)
# Ray gives the head node 1.0 of this resource; a trial driver asking for a sliver of it lands there.
HEAD_RESOURCE = "node:__internal_head__"
HEAD_SHARE = 0.01  # up to 100 trial drivers on the head at once


def worker_resources(cpus_per_worker: float, use_gpu: bool) -> dict[str, float]:
    """What one worker of a gang asks for: its CPUs and, on GPU clusters, one GPU."""
    return {"CPU": cpus_per_worker} | ({"GPU": 1} if use_gpu else {})


def driver_resources(drivers_on_head: bool) -> dict[str, float]:
    """What one trial's driver asks for (Ray Train's controller is placed on the node of its driver)."""
    return {"cpu": DRIVER_CPU} | ({HEAD_RESOURCE: HEAD_SHARE} if drivers_on_head else {})


def method_space(entry: MethodEntry) -> dict[str, dict[str, Any]]:
    """The entry's space, or the method's default one, minus keys the entry fixes."""
    space = entry.space if entry.space is not None else dict(describe(entry.name).default_space)
    return {key: dist for key, dist in space.items() if key not in entry.params}


def grid_configs(entry: MethodEntry, where: str) -> list[dict[str, Any]]:
    """Every combination of a method's grid/choice values (grid search)."""
    space = method_space(entry)
    axes = []
    for key, dist in space.items():
        (kind, values), = dist.items()
        if kind not in ("grid", "choice"):
            origin = "" if entry.space is not None else f" (method {entry.name!r}'s default space)"
            raise SweepError(f"field '{where}.space.{key}': grid search needs grid or choice values, got {kind}"
                             f"{origin}; give space: {{{key}: {{grid: [...]}}}} or fix it in params, or use "
                             f"sweep.search: random or optuna, which sample it")
        axes.append([(key, value) for value in values])
    return [{"method": entry.name, **entry.params, **dict(combo)} for combo in itertools.product(*axes)]


def tune_domain(dist: dict[str, Any]):
    from ray import tune

    (kind, values), = dist.items()
    if kind in ("grid", "choice"):
        return tune.choice(values)
    if kind == "uniform":
        return tune.uniform(*values)
    if kind == "loguniform":
        return tune.loguniform(*values)
    return tune.randint(values[0], values[1] + 1)  # inclusive high, as users write it


def trial_space(spec: JobSpec) -> dict[str, Any]:
    """Tune param_space for grid and random search: one grid point per method (or per method setting)."""
    from ray import tune

    sweep = spec.sweep
    if sweep.search == "grid":
        configs = [c for i, e in enumerate(sweep.methods) for c in grid_configs(e, f"sweep.methods[{i}]")]
    else:
        configs = [{"method": e.name, **e.params, **{k: tune_domain(d) for k, d in method_space(e).items()}}
                   for e in sweep.methods]
    return {"trial": tune.grid_search(configs)}


class OptunaSpace:
    """Define-by-run space for Optuna: the method is a categorical choice, its params conditional on it.

    A class, not a closure: Tune pickles the search algorithm when it checkpoints the experiment."""

    def __init__(self, entries: list[MethodEntry]) -> None:
        self.entries = {entry.name: entry for entry in entries}

    def __call__(self, trial) -> dict[str, Any]:
        name = trial.suggest_categorical("method", sorted(self.entries))
        entry = self.entries[name]
        for key, dist in method_space(entry).items():
            (kind, values), = dist.items()
            label = f"{name}.{key}"
            if kind in ("grid", "choice"):
                trial.suggest_categorical(label, values)
            elif kind == "randint":
                trial.suggest_int(label, values[0], values[1])
            else:
                trial.suggest_float(label, values[0], values[1], log=kind == "loguniform")
        return {f"{name}.{key}": value for key, value in entry.params.items()}


def optuna_space(spec: JobSpec) -> OptunaSpace:
    return OptunaSpace(list(spec.sweep.methods))


def split_trial_config(config: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Tune config → (method, method params, trainer overrides), for both space layouts."""
    flat = dict(config["trial"]) if "trial" in config else {}
    if not flat:  # optuna layout: method + "<method>.<key>" entries
        method = config["method"]
        prefix = f"{method}."
        flat = {"method": method, **{k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}}
    method = flat.pop("method")
    trainer = {k: flat.pop(k) for k in TRAINER_KEYS if k in flat}
    return method, flat, trainer


def gang_fits(spec: JobSpec, cluster_cpus: float, cluster_gpus: float) -> int:
    """How many trials can run at once without any waiting half-scheduled."""
    s = spec.scaling
    per_trial_cpus = s.num_workers * s.cpus_per_worker + DRIVER_CPU
    fits = math.floor(cluster_cpus / per_trial_cpus + 1e-9)
    if s.use_gpu:
        fits = min(fits, math.floor(cluster_gpus / s.num_workers))
    return fits


def placement_problem(spec: JobSpec, nodes: list[dict[str, float]]) -> str | None:
    """Why no trial gang could ever be placed on these nodes (each node's total resources, the head's with
    HEAD_RESOURCE), or None. Only what the placement strategy adds to the cluster-wide CPU count."""
    s = spec.scaling
    per_worker = worker_resources(s.cpus_per_worker, s.use_gpu)

    def workers_on(node: dict[str, float]) -> int:
        return min(math.floor(node.get(key, 0.0) / need + 1e-9) for key, need in per_worker.items())

    nodes_with_room = sum(workers_on(n) >= 1 for n in nodes)
    if s.placement_strategy == "STRICT_SPREAD" and nodes_with_room < s.num_workers:
        return (f"field 'scaling.placement_strategy': STRICT_SPREAD puts each of the {s.num_workers} workers on a "
                f"node of its own, and {nodes_with_room} of the cluster's {len(nodes)} nodes can hold one")
    if s.placement_strategy == "STRICT_PACK" and max((workers_on(n) for n in nodes), default=0) < s.num_workers:
        return (f"field 'scaling.placement_strategy': STRICT_PACK puts all {s.num_workers} workers on one node, "
                f"and no node of the cluster can hold them")
    if s.drivers_on_head and not any(n.get(HEAD_RESOURCE, 0) and n.get("CPU", 0) >= DRIVER_CPU for n in nodes):
        return (f"field 'scaling.drivers_on_head': trial drivers need {DRIVER_CPU} CPU on the head node, which has "
                f"none; start it with CPUs or set drivers_on_head: false")
    return None


def build_tuner(spec: JobSpec, run_dir: Path, base_config: dict[str, Any], max_concurrent: int, trainable=None):
    """The sweep's Tuner: every search × scheduler the spec accepts (``trainable``: the trial driver, or a
    stand-in with the same reports in tests)."""
    from ray import tune

    from orchestrator.tracking import tune_callbacks

    metric, mode = _metric(spec)
    single = not spec.sweep.multi_objective
    search_alg, param_space = search_algorithm(spec, max_concurrent)
    tune_config = tune.TuneConfig(
        search_alg=search_alg, scheduler=scheduler(spec), num_samples=spec.sweep.num_samples,
        # The cap is the search algorithm's own (BasicVariantGenerator / ConcurrencyLimiter): given here as
        # well, Tune would warn that it ignores it.
        max_concurrent_trials=None,
        # One metric for the searcher and the scheduler alike; a multi-objective search names its own.
        metric=metric if single else None, mode=mode if single else None,
        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
    )
    callbacks = tune_callbacks(spec.tracking, run_dir, base_config["run_id"], spec.name)
    run_config = tune.RunConfig(name="tune", storage_path=str(run_dir), progress_reporter=progress_reporter(spec),
                                verbose=1, callbacks=callbacks)
    return tune.Tuner(trainable or trial_trainable(spec, base_config), param_space=param_space,
                      tune_config=tune_config, run_config=run_config)


def search_algorithm(spec: JobSpec, max_concurrent: int):
    """(search algorithm capped at ``max_concurrent`` live trials, Tune param_space) for the spec's search."""
    if spec.sweep.search != "optuna":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=spec.seed, max_concurrent=max_concurrent), trial_space(spec)
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    # The searcher is told its metric itself: Tune passes TuneConfig's on only with a param_space, and a
    # define-by-run space has none. (TuneConfig names it too, for the scheduler.)
    metric, mode = _metric(spec)
    sampler = (optuna.samplers.NSGAIISampler if spec.sweep.multi_objective else optuna.samplers.TPESampler)(seed=spec.seed)
    searcher = OptunaSearch(space=optuna_space(spec), metric=metric, mode=mode, sampler=sampler)
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent), {}


def scheduler(spec: JobSpec):
    """ASHA on the spec's metric with the epoch as time, or None (FIFO)."""
    if spec.sweep.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=max_epochs(spec), grace_period=spec.sweep.grace_period,
                         reduction_factor=spec.sweep.reduction_factor)


def max_epochs(spec: JobSpec) -> int:
    """The most epochs any trial of the sweep can run (a method's params or space may set its own)."""
    most = spec.training.epochs
    for entry in spec.sweep.methods:
        if "epochs" in entry.params:
            most = max(most, int(entry.params["epochs"]))
        elif "epochs" in method_space(entry):
            (kind, values), = method_space(entry)["epochs"].items()
            most = max(most, int(values[-1] if kind == "randint" else max(values)))
    return most


def _metric(spec: JobSpec) -> tuple[Any, Any]:
    if spec.sweep.multi_objective:
        return ["log10_forget_quality", "utility_loss"], ["max", "min"]
    return spec.sweep.metric, "max"


def _trial_name(trial) -> str:
    method = trial.config.get("trial", {}).get("method") or trial.config.get("method", "trial")
    return f"{method}_{trial.trial_id}"


def progress_reporter(spec: JobSpec):
    from ray import tune

    return tune.CLIReporter(
        metric_columns={"epoch": "epoch", "forget_quality": "FQ", "model_utility": "MU",
                        "utility_loss": "util.loss", "status": "status"},
        parameter_columns={"trial/method": "method"} if spec.sweep.search != "optuna" else {"method": "method"},
        max_report_frequency=30, sort_by_metric=False,
    )


def trial_trainable(spec: JobSpec, base_config: dict[str, Any]):
    """The Tune trainable: ``driver`` with the run's base config and the swept method classes.

    The classes travel with the trainable (by value for classes defined in a user's script), so a method
    registered in a tuning script is known to trial drivers and workers without touching orchestrator/.
    """
    from ray import tune

    from methods import get_method_class

    method_classes = {entry.name: get_method_class(entry.name) for entry in spec.sweep.methods}
    return tune.with_resources(
        tune.with_parameters(driver, base_config=base_config, method_classes=method_classes),
        driver_resources(spec.scaling.drivers_on_head),
    )


def driver(config: dict[str, Any], base_config: dict[str, Any], method_classes: dict[str, type]) -> None:
    """One Tune trial: fit a TorchTrainer gang running the worker loop, forwarding its reports."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.worker import train_loop_per_worker

    method, params, trainer_overrides = split_trial_config(config)
    trial_id = tune.get_context().get_trial_id()
    worker_config = dict(base_config)
    worker_config.update(
        job="unlearn", method=method, method_class=method_classes[method], params=params, trial_id=f"{method}_{trial_id}",
        trial_params={**params, **trainer_overrides},
        training={**base_config["training"], **trainer_overrides},
    )
    scaling = base_config["scaling"]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config,
        scaling_config=ScalingConfig(num_workers=scaling["num_workers"], use_gpu=scaling["use_gpu"],
                                     resources_per_worker=worker_resources(scaling["cpus_per_worker"], scaling["use_gpu"]),
                                     # a run directory from before the field has no strategy: Ray's default
                                     placement_strategy=scaling.get("placement_strategy", "PACK")),
        run_config=RunConfig(name=worker_config["trial_id"], storage_path=str(Path(base_config["run_dir"]) / "train"),
                             failure_config=FailureConfig(max_failures=scaling["max_failures"]),
                             checkpoint_config=CheckpointConfig(num_to_keep=scaling["checkpoints_to_keep"]),
                             callbacks=[TuneReportCallback()], logging_config=LoggingConfig(TRAIN_CONSOLE_LEVEL)),
    )
    trainer.fit()


def restore_tuner(spec: JobSpec, run_dir: Path, base_config: dict[str, Any]):
    """Reload the Tune experiment: finished trials stay finished, unfinished ones resume from checkpoints."""
    from ray import tune

    trainable = trial_trainable(spec, base_config)
    return tune.Tuner.restore(str(run_dir / "tune"), trainable=trainable, resume_unfinished=True,
                              resume_errored=True, restart_errored=False)


def live_gangs() -> set[str]:
    """Ids of the cluster's placement groups not yet removed (each Ray Train gang holds one)."""
    import ray.util

    return {pg_id for pg_id, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"}


def wait_for_gangs_to_end(before: set[str], log, timeout: float = 60.0, poll: float = 0.5) -> set[str]:
    """Wait until every gang started since ``before`` is gone; return those still alive at the timeout.

    Tune stops a trial (ASHA) by ending its driver; the gang's workers live on until Ray Train's
    PlacementGroupCleaner removes their placement group, and meanwhile may finish an epoch and write its
    evals row. Statuses are finalized only over rows no worker can still write (seen in CI: a stopped
    trial's epoch-2 row landed after the sweep had marked its epoch-1 row stopped)."""
    import time

    deadline = time.monotonic() + timeout
    while alive := live_gangs() - before:
        if time.monotonic() >= deadline:
            log(f"sweep: {len(alive)} trial gangs still alive after {timeout:.0f} s; statuses finalized without them")
            return alive
        time.sleep(poll)
    return set()
