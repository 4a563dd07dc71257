"""Search-space construction (pure) and the sweep's Tune behaviour on a real local Ray."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import yaml

from orchestrator.spec import parse_spec
from orchestrator.sweep import SweepError, gang_fits, grid_configs, optuna_space, split_trial_config, trial_space
from tests.conftest import ROOT, tiny_spec


def _spec(methods, **sweep):
    return parse_spec(tiny_spec("/tmp/unused-cache", sweep={"methods": methods, **sweep}))


# ---------------------------------------------------------------- pure parts
def test_grid_expands_every_combination_and_keeps_fixed_params():
    spec = _spec([{"name": "npo", "params": {"alpha": 2.0},
                   "space": {"lr": {"grid": [1e-4, 2e-4]}, "beta": {"choice": [0.1, 0.5, 1.0]}}}])
    configs = grid_configs(spec.sweep.methods[0], "sweep.methods[0]")
    assert len(configs) == 2 * 3
    assert all(c["method"] == "npo" and c["alpha"] == 2.0 for c in configs)
    assert {(c["lr"], c["beta"]) for c in configs} == {(lr, b) for lr in (1e-4, 2e-4) for b in (0.1, 0.5, 1.0)}


def test_grid_refuses_continuous_dimensions_naming_the_field():
    spec = _spec([{"name": "ga", "space": {"lr": {"loguniform": [1e-5, 1e-3]}}}])
    with pytest.raises(SweepError, match=r"sweep.methods\[0\].space.lr"):
        grid_configs(spec.sweep.methods[0], "sweep.methods[0]")


def test_default_space_is_used_when_the_spec_names_only_the_method():
    from methods import get_method_class

    spec = _spec([{"name": "npo"}], search="random")
    point = trial_space(spec)["trial"]["grid_search"][0]
    assert set(point) == {"method"} | set(get_method_class("npo").default_space)


def test_trial_config_split_for_both_layouts():
    grid_layout = {"trial": {"method": "npo", "lr": 1e-4, "epochs": 3, "beta": 0.5}}
    assert split_trial_config(grid_layout) == ("npo", {"beta": 0.5}, {"lr": 1e-4, "epochs": 3})
    optuna_layout = {"method": "npo", "npo.lr": 2e-4, "npo.beta": 0.1, "ga.lr": 9.0}
    assert split_trial_config(optuna_layout) == ("npo", {"beta": 0.1}, {"lr": 2e-4})


def test_optuna_space_is_conditional_on_the_method():
    import optuna

    spec = _spec([{"name": "ga", "space": {"lr": {"loguniform": [1e-5, 1e-3]}}},
                  {"name": "npo", "params": {"alpha": 0.0}, "space": {"beta": {"choice": [0.1, 0.5]}}}],
                 search="optuna")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        trial = study.ask()
        fixed = optuna_space(spec)(trial)
        if trial.params["method"] == "ga":
            assert set(trial.params) == {"method", "ga.lr"} and fixed == {}
        else:
            assert set(trial.params) == {"method", "npo.beta"} and fixed == {"npo.alpha": 0.0}
        study.tell(trial, 0.0)


def test_gang_fits_counts_whole_gangs_only():
    spec = parse_spec(tiny_spec("/tmp/x"))  # 2 workers × 0.99 CPU + 0.01 for the trial driver
    assert gang_fits(spec, 2.0, 0.0) == 1
    assert gang_fits(spec, 3.9, 0.0) == 1
    assert gang_fits(spec, 4.0, 0.0) == 2
    assert gang_fits(spec, 1.0, 0.0) == 0


# ---------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def grid_run(ray_local, tiny_cache, tmp_path_factory):
    """Two methods × two learning rates, 2-worker ZeRO-2 gangs, one run shared by the tests below."""
    from orchestrator.api import run

    run_dir = tmp_path_factory.mktemp("grid") / "run"
    spec = parse_spec(tiny_spec(tiny_cache, sweep={"methods": [
        {"name": "ga", "space": {"lr": {"grid": [5e-5, 2e-4]}}},
        {"name": "graddiff", "space": {"lr": {"grid": [5e-5, 2e-4]}}},
    ]}))
    return run(spec, run_dir=run_dir, log=lambda line: None)


@pytest.mark.integration
def test_grid_sweep_writes_one_final_row_per_trial(grid_run):
    from orchestrator.results import EVALS_SCHEMA

    assert set(EVALS_SCHEMA.names) <= set(grid_run.evals.column_names)
    assert grid_run.ranking is not None and grid_run.ranking.num_rows >= 4
    rows = [r for r in grid_run.evals.to_pylist() if r["method"] not in ("target", "retain")]
    trials = {r["trial_id"] for r in rows}
    assert len(trials) == 4
    final = [r for r in rows if r["status"] == "ok"]
    assert sorted(r["trial_id"] for r in final) == sorted(trials)  # exactly one final row per trial
    for trial in trials:
        epochs = sorted(r["epoch"] for r in rows if r["trial_id"] == trial)
        assert epochs == [1, 2]
    lrs = sorted(json.loads(r["params"])["lr"] for r in final)
    assert lrs == [5e-5, 5e-5, 2e-4, 2e-4]
    for r in final:  # reproducibility columns
        assert r["num_workers"] == 2 and r["per_worker_batch"] == 4 and r["grad_accum"] == 1
        assert r["effective_batch"] == 8 and r["zero_stage"] == 2 and r["seed"] == 0
        assert r["spec_hash"] and r["git_sha"] and "torch" in json.loads(r["versions"])


def _epochs_and_last_rows(rows: list[dict]) -> tuple[dict[str, int], dict[str, dict]]:
    last: dict[str, dict] = {}
    for row in rows:
        if row["trial_id"] not in last or row["epoch"] > last[row["trial_id"]]["epoch"]:
            last[row["trial_id"]] = row
    return {trial: row["epoch"] for trial, row in last.items()}, last


@pytest.mark.integration
def test_asha_stops_the_bad_half_early(ray_local, tiny_cache, tmp_path):
    """Two trials of a learning rate that moves forget quality in the first epoch, then two (1e-9) that leave
    the target as it was: ASHA stops the second pair at its first rung.

    The metric is log10 forget quality. With 6 forget pairs the KS p-value takes few values (target: 0.474).
    The good pair shares one lr: every trial has the same seed and data, so the two are equal at every rung
    and neither can stop the other (two good lrs, 3e-3 and 5e-3, reached 0.931 and 1.0 at epoch 1, and the
    first to report set the bar the other missed; 1e-3 stayed at 0.474 on one machine's target). Two trials
    run at once and the good pair comes first, so when a bad trial reaches the rung both good ones are
    recorded there. 4 epochs leave a stopped trial room to be killed (it may finish another epoch meanwhile)
    before it could complete.
    """
    from orchestrator.api import run

    spec = parse_spec(tiny_spec(
        tiny_cache,
        training={"epochs": 4, "batch_size": 4, "max_length": 64, "warmup_epochs": 0},
        scaling={"num_workers": 1, "cpus_per_worker": 0.99, "zero_stage": 2},
        sweep={"methods": [{"name": "ga", "space": {"lr": {"grid": [3e-3, 3e-3, 1e-9, 1e-9]}}}],
               "scheduler": "asha", "metric": "log10_forget_quality", "grace_period": 1, "reduction_factor": 2,
               "max_concurrent": 2},
    ))
    result = run(spec, run_dir=tmp_path / "run", log=lambda line: None)
    rows = [r for r in result.evals.to_pylist() if r["method"] == "ga"]
    epochs, last = _epochs_and_last_rows(rows)
    lr = {trial: json.loads(row["params"])["lr"] for trial, row in last.items()}
    bad = sorted(t for t in lr if lr[t] == 1e-9)
    good = sorted(t for t in lr if lr[t] != 1e-9)
    assert len(bad) == 2 and len(good) == 2
    first_fq = {r["trial_id"]: r["forget_quality"] for r in rows if r["epoch"] == 1}
    assert max(first_fq[t] for t in bad) < min(first_fq[t] for t in good)  # why ASHA tells them apart
    assert all(last[t]["status"] == "stopped" for t in bad)
    assert max(epochs[t] for t in bad) < min(epochs[t] for t in good)  # fewer epochs recorded for them
    assert max(epochs[t] for t in good) == 4 and any(last[t]["status"] == "ok" for t in good)
    # scaling.checkpoints_to_keep (2): older per-epoch checkpoints are deleted, also of the 4-epoch trials.
    kept = {trial.name: len(list(trial.glob("checkpoint_2*"))) for trial in (tmp_path / "run" / "train").iterdir()}
    assert len(kept) == 4 and all(1 <= n <= 2 for n in kept.values()), kept


@pytest.mark.integration
def test_optuna_multi_objective_sweep_tells_the_searcher_both_objectives(ray_local, tiny_cache, tmp_path):
    """NSGA-II over (log10 FQ, utility loss) with the method itself a searched choice; the search algorithm,
    OptunaSpace included, is pickled into the experiment's checkpoint. The study saved there must hold every
    trial as complete with both values finite and equal to what the trial's evals row says.

    Utility loss needs a target whose model utility is above 0: the shared tiny target's (12 prepare epochs)
    is about 0.12."""
    import cloudpickle
    import optuna

    from orchestrator.api import run
    from orchestrator.scores import log10_forget_quality
    from orchestrator.sweep import OptunaSpace

    spec = parse_spec(tiny_spec(
        tiny_cache,
        training={"epochs": 1, "batch_size": 4, "max_length": 64, "warmup_epochs": 0},
        scaling={"num_workers": 1, "cpus_per_worker": 0.99, "zero_stage": 0},
        sweep={"methods": [{"name": "ga", "space": {"lr": {"loguniform": [1e-5, 1e-3]}}},
                           {"name": "npo", "space": {"lr": {"loguniform": [1e-5, 1e-3]}}}],
               "search": "optuna", "multi_objective": True, "num_samples": 3, "max_concurrent": 2},
    ))
    run_dir = tmp_path / "run"
    result = run(spec, run_dir=run_dir, log=lambda line: None)
    evals = result.evals.to_pylist()
    target = next(r for r in evals if r["method"] == "target")
    assert target["model_utility"] > 0  # else utility loss is undefined and nothing below can hold
    rows = [r for r in evals if r["method"] in ("ga", "npo")]
    assert len({r["trial_id"] for r in rows}) == 3
    assert len(rows) == 3 and all(r["status"] == "ok" and r["epoch"] == 1 for r in rows)
    for r in rows:
        assert r["forget_quality"] is not None and 1e-5 <= json.loads(r["params"])["lr"] <= 1e-3
    assert result.ranking is not None
    (state_file,) = (run_dir / "tune").glob("searcher-state-*.pkl")
    state = cloudpickle.loads(state_file.read_bytes())
    assert isinstance(_find_instance(state, OptunaSpace), OptunaSpace)
    # What the searcher was told: one complete Optuna trial per Tune trial, with (log10 FQ, utility loss)
    # as that trial's row has them (matched by method and learning rate).
    study = _find_instance(state, optuna.Study)
    assert isinstance(study, optuna.Study)
    told = study.get_trials(deepcopy=False)
    assert [t.state for t in told] == [optuna.trial.TrialState.COMPLETE] * 3
    by_point = {(r["method"], json.loads(r["params"])["lr"]): r for r in rows}
    for trial in told:
        method = trial.params["method"]
        row = by_point[(method, trial.params[f"{method}.lr"])]
        assert len(trial.values) == 2 and all(math.isfinite(v) for v in trial.values), trial.values
        assert trial.values == [pytest.approx(log10_forget_quality(row["forget_quality"])),
                                pytest.approx(row["utility_loss"])]


def _find_instance(obj, cls, depth: int = 0):
    """The first ``cls`` instance inside a pickled search-algorithm state (dicts, lists, attributes)."""
    if isinstance(obj, cls):
        return obj
    if depth > 4:
        return None
    children = (list(obj.values()) if isinstance(obj, dict) else list(obj) if isinstance(obj, (list, tuple))
                else list(vars(obj).values()) if hasattr(obj, "__dict__") else [])
    for child in children:
        found = _find_instance(child, cls, depth + 1)
        if found is not None:
            return found
    return None


README_SCRIPT = re.compile(r"```python\n(# my_sweep\.py\n.*?)```", re.S)


@pytest.mark.integration
def test_readme_tuning_script_registers_and_sweeps_a_new_method(ray_local, tiny_cache, tmp_path):
    """The README's script, as written, run against the tiny spec on this test's Ray cluster."""
    script = README_SCRIPT.search((ROOT / "README.md").read_text()).group(1)
    (tmp_path / "my_sweep.py").write_text(script)
    spec = tiny_spec(tiny_cache, scaling={"num_workers": 1, "cpus_per_worker": 0.99, "zero_stage": 0},
                     training={"epochs": 1, "batch_size": 4, "max_length": 64, "warmup_epochs": 0})
    spec["run_dir"] = str(tmp_path / "run")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(spec))
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address,
               PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    done = subprocess.run([sys.executable, "my_sweep.py", str(tmp_path / "tiny.yaml")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ranking:" in done.stdout  # the script prints the run's summary
    from orchestrator.results import read_evals

    rows = [r for r in read_evals(tmp_path / "run").to_pylist() if r["method"] == "scaled_ga"]
    assert sorted(json.loads(r["params"])["scale"] for r in rows) == [0.5, 1.0]  # its default space, swept
    assert all(r["status"] == "ok" and r["forget_quality"] is not None for r in rows)


def test_statuses_wait_for_the_gangs_the_sweep_started(monkeypatch):
    """Finalizing waits until every placement group created during the sweep is removed (a stopped trial's
    workers can still write a row until then); groups that existed before are not waited for."""
    import ray.util

    from orchestrator.sweep import wait_for_gangs_to_end

    tables = iter([
        {"old": "CREATED", "a": "CREATED", "b": "PENDING"},
        {"old": "CREATED", "a": "REMOVED", "b": "CREATED"},
        {"old": "CREATED", "a": "REMOVED", "b": "REMOVED"},
    ])
    calls = []

    def table():
        calls.append(1)
        return {pg: {"state": state} for pg, state in next(tables).items()}

    monkeypatch.setattr(ray.util, "placement_group_table", table)
    lines = []
    assert wait_for_gangs_to_end({"old"}, lines.append, timeout=5, poll=0) == set()
    assert len(calls) == 3 and lines == []  # returned at the first table without a live new gang

    monkeypatch.setattr(ray.util, "placement_group_table", lambda: {"old": {"state": "CREATED"},
                                                                     "stuck": {"state": "CREATED"}})
    assert wait_for_gangs_to_end({"old"}, lines.append, timeout=0, poll=0) == {"stuck"}
    assert lines == ["sweep: 1 trial gangs still alive after 0 s; statuses finalized without them"]
