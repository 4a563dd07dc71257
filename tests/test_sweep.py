"""Search-space construction (pure) and the sweep's Tune behaviour on a real local Ray."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.spec import parse_spec
from orchestrator.sweep import SweepError, gang_fits, grid_configs, optuna_space, split_trial_config, trial_space
from tests.conftest import tiny_spec


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
    optuna = pytest.importorskip("optuna")
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


@pytest.mark.integration
def test_resume_of_a_finished_run_reruns_nothing(grid_run):
    from orchestrator.api import resume

    files = {p: p.stat().st_mtime_ns for p in (grid_run.run_dir / "evals").glob("*.parquet")}
    result = resume(grid_run.run_dir, log=lambda line: None)
    assert {p: p.stat().st_mtime_ns for p in (grid_run.run_dir / "evals").glob("*.parquet")} == files
    assert result.evals.num_rows == grid_run.evals.num_rows
