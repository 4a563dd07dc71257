"""Every search × scheduler the spec accepts builds through the sweep's own Tuner construction and runs (a
stand-in trainable with the trial driver's reports, so it takes seconds), and the concurrency cap holds."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from orchestrator.spec import SpecError, parse_spec
from orchestrator.sweep import build_tuner, max_epochs, split_trial_config
from tests.conftest import tiny_spec

SEARCHES = {
    "grid": {"search": "grid"},
    "random": {"search": "random", "num_samples": 3},
    "optuna": {"search": "optuna", "num_samples": 3},
    "optuna-multi": {"search": "optuna", "num_samples": 3, "multi_objective": True},
}
METHODS = [{"name": "ga", "space": {"lr": {"grid": [1e-4, 1e-3, 1e-2]}, "epochs": {"grid": [3]}}}]


def stand_in(config: dict) -> None:
    """Reports as the trial driver does: epoch, score, log10 FQ and utility loss; logs when it ran."""
    from ray import tune

    _, _, trainer = split_trial_config(config)
    log, start = Path(config["__log_dir__"]) / f"{time.time_ns()}.json", time.time()
    for epoch in range(1, trainer["epochs"] + 1):
        time.sleep(0.05)
        quality = -10.0 + epoch * 1e3 * trainer["lr"]  # larger lr forgets faster
        log.write_text(json.dumps([start, time.time()]))  # before the report: ASHA may stop the trial in it
        tune.report({"epoch": epoch, "score": quality - 0.1, "log10_forget_quality": quality, "utility_loss": 0.1})


def spec_for(cache, search: str, scheduler: str):
    sweep = {"methods": METHODS, "scheduler": scheduler, "grace_period": 1, "reduction_factor": 2, **SEARCHES[search]}
    return parse_spec(tiny_spec(cache, sweep=sweep))


@pytest.mark.parametrize("search", sorted(SEARCHES))
@pytest.mark.parametrize("scheduler", ["fifo", "asha"])
def test_each_accepted_combination_runs_or_is_refused_at_validation(search, scheduler, ray_local, tmp_path):
    from ray import tune

    if search == "optuna-multi" and scheduler == "asha":
        with pytest.raises(SpecError, match="sweep.scheduler"):
            spec_for(tmp_path, search, scheduler)
        return
    spec = spec_for(tmp_path, search, scheduler)
    logs = tmp_path / "logs"
    logs.mkdir()
    trainable = tune.with_resources(tune.with_parameters(lambda config: stand_in(dict(config, __log_dir__=str(logs)))),
                                    {"cpu": 1})
    tuner = build_tuner(spec, tmp_path / "run", {"run_id": "test"}, max_concurrent=1, trainable=trainable)
    results = tuner.fit()
    assert results.num_errors == 0
    assert len(results) == 3
    # The cap of one live trial held on a 2-CPU cluster that fits two: the trials ran one after another.
    spans = sorted(json.loads(p.read_text()) for p in logs.glob("*.json"))
    assert len(spans) == 3
    assert all(later[0] >= earlier[1] - 0.01 for earlier, later in zip(spans, spans[1:]))
    if search != "optuna-multi":
        assert max(r.metrics["score"] for r in results) > -10  # the searcher/scheduler saw the metric


def test_asha_horizon_is_the_longest_trial_of_the_space(tmp_path):
    spec = parse_spec(tiny_spec(tmp_path, sweep={"methods": [
        {"name": "ga", "space": {"epochs": {"grid": [2, 6]}}}, {"name": "npo", "params": {"epochs": 4}}]}))
    assert max_epochs(spec) == 6
