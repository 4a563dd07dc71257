"""A real target with no retain model, named by a path relative to where the run starts: nothing pretends
to be forget quality, the rows say why, and the ranking comes out of what was measured."""
from __future__ import annotations

import json

import pytest

from orchestrator.spec import SpecError, parse_spec
from tests.conftest import tiny_spec


def test_relative_model_paths_are_resolved_when_the_spec_is_loaded(tmp_path, monkeypatch):
    (tmp_path / "models" / "target").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(tiny_spec(".cache", model={"target": "models/target", "tokenizer": "gpt2"}))
    assert spec.model.target == str(tmp_path / "models" / "target")  # exists here: a path
    assert spec.model.tokenizer == "gpt2"  # no such path: a hub id, untouched
    assert spec.prepare.cache_dir == str(tmp_path / ".cache")


def test_a_metric_that_needs_forget_quality_is_refused_without_a_retain_model(tmp_path):
    (tmp_path / "target").mkdir()
    sweep = {"methods": [{"name": "ga", "space": {"lr": {"grid": [1e-4]}}}], "metric": "log10_forget_quality"}
    with pytest.raises(SpecError, match="field 'sweep.metric': .*needs a retain model"):
        parse_spec(tiny_spec(tmp_path, model={"target": str(tmp_path / "target")}, sweep=sweep))
    with pytest.raises(SpecError, match="field 'evaluation.generation'"):
        parse_spec(tiny_spec(tmp_path, evaluation={"generation": False}))


def test_a_multi_objective_search_is_refused_without_a_retain_model(tmp_path):
    (tmp_path / "target").mkdir()
    sweep = {"methods": [{"name": "ga", "space": {"lr": {"loguniform": [1e-5, 1e-3]}}}], "search": "optuna",
             "multi_objective": True}
    with pytest.raises(SpecError, match="field 'sweep.multi_objective': .*needs a retain model"):
        parse_spec(tiny_spec(tmp_path, model={"target": str(tmp_path / "target")}, sweep=sweep))


def test_a_target_without_model_utility_is_refused_once_prepare_has_scored_it(tmp_path):
    from orchestrator.api import check_target_utility

    spec = parse_spec(tiny_spec(tmp_path))  # sweep.metric: score, which needs utility loss = 1 − MU/MU_target
    with pytest.raises(SpecError, match="field 'model.target': the target's model utility is 0"):
        check_target_utility(spec, 0.0)
    check_target_utility(spec, 0.2)
    check_target_utility(spec, None)  # not scored (no utility sets): nothing to refuse on
    fq_only = parse_spec(tiny_spec(tmp_path, sweep={"methods": [{"name": "ga", "space": {"lr": {"grid": [1e-4]}}}],
                                                    "metric": "log10_forget_quality"}))
    check_target_utility(fq_only, 0.0)  # log10 FQ needs no utility


def test_an_unmeasured_epoch_reports_no_score_and_a_diverged_one_reports_the_floor():
    from orchestrator.steps import EpochStats
    from orchestrator.trial_report import DIVERGED_SCORE, epoch_metrics

    config = {"utility_weight": 10.0, "benchmark": {"forget_axis": "forget_quality"}}
    measured = {"status": "ok", "forget_quality": 0.01, "utility_loss": 0.05}
    # log10(0.01) − 10 · 0.05 = −2 − 0.5
    assert epoch_metrics(config, measured, EpochStats())["score"] == pytest.approx(-2.5)
    for missing in ("forget_quality", "utility_loss"):
        metrics = epoch_metrics(config, {**measured, missing: None}, EpochStats())
        assert "score" not in metrics  # Tune's schedulers skip the result instead of ranking a made-up number
    diverged = epoch_metrics(config, {"status": "diverged", "forget_quality": None, "utility_loss": None}, EpochStats())
    assert diverged["score"] == DIVERGED_SCORE


@pytest.mark.integration
def test_no_retain_model_no_forget_quality_and_still_a_ranking(ray_local, tiny_cache, tmp_path, monkeypatch):
    import shutil

    from orchestrator.api import prepare_only, run

    # A "hub-style" target: a from_pretrained directory (the tiny job's fine-tuned target, copied), named
    # relative to the directory the run starts in, with no retain model beside it.
    prepared = prepare_only(parse_spec(tiny_spec(tiny_cache)), log=lambda line: None)
    directory = tmp_path / "work" / "target"
    shutil.copytree(prepared.model_path, directory)
    monkeypatch.chdir(tmp_path / "work")
    spec = parse_spec(tiny_spec(
        ".cache", model={"target": "target", "prompt_template": "embedded"},
        scaling={"num_workers": 1, "cpus_per_worker": 0.99, "zero_stage": 2},
        sweep={"methods": [{"name": "ga", "space": {"lr": {"grid": [1e-4, 1e-3]}, "epochs": {"grid": [1]}}}]},
    ))
    lines = []
    result = run(spec, run_dir="run", log=lines.append)
    rows = result.evals.to_pylist()
    assert {r["method"] for r in rows} == {"target", "ga"}  # no retain row: there is no retain model
    assert all(r["forget_quality"] is None and r["privleak"] is None for r in rows)
    for row in rows:
        reasons = json.loads(row["not_measured"])
        assert "retain model" in reasons["forget_quality"] and "retain model" in reasons["privleak"]
        assert row["forget_prob"] is not None and row["model_utility"] is not None
    assert sum("no retain model" in line for line in lines) == 1  # the run warned once
    ranked = [r for r in result.ranking.to_pylist() if not r["reference"]]
    assert [r["rank"] for r in ranked] == [1, 2]
    # ranked on what was measured: the lower forget probability first (both within the ceiling or not)
    if ranked[0]["over_ceiling"] == ranked[1]["over_ceiling"] and ranked[0]["front"] != ranked[1]["front"]:
        assert ranked[0]["forget_prob"] <= ranked[1]["forget_prob"] or ranked[0]["utility_loss"] < ranked[1]["utility_loss"]
    assert (tmp_path / "work" / "run" / "spec.yaml").read_text().count(str(directory)) == 1  # the resolved spec is kept
