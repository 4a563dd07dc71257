"""Robustness probes: relearning brings back what it did not see, the attack pairs are never scored, and a
sweep's trials get probe rows for the epoch the comparison picks."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from orchestrator.data import generate_benchmark
from orchestrator.encoding import collate, encode_pair
from orchestrator.evaluation.scorer import ModelScorer
from orchestrator.models import build_embedded_model
from orchestrator.probes import _evaluate_rest, _relearn_batches
from orchestrator.robustness import relearn_copy
from orchestrator.spec import parse_spec
from orchestrator.tokenizer import benchmark_texts, train_tokenizer
from tests.conftest import tiny_spec

TEMPLATE = "qa"


def _nll_steps(model, batch, steps: int, lr: float, sign: float) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = sign * model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def unlearned():
    """A tiny Llama that learned 20 authors' facts, then had the last 2 authors' pushed down by ascent."""
    bench = generate_benchmark(seed=1, num_authors=20, questions_per_author=6)
    tokenizer = train_tokenizer(benchmark_texts(bench, TEMPLATE), 300)
    model = build_embedded_model(len(tokenizer), 48, 2, 2, 96, 128, seed=0)
    torch.manual_seed(0)
    encode = lambda rows: collate([encode_pair(tokenizer, r["question"], r["answer"], TEMPLATE, 96) for r in rows],  # noqa: E731
                                  tokenizer.pad_token_id)
    _nll_steps(model, encode(bench["full"]), 80, 5e-3, 1.0)
    _nll_steps(model, encode(bench["forget10"]), 12, 1e-3, -1.0)  # gradient ascent on the forget pairs
    data = {"forget10": bench["forget10"], "retain90": bench["retain90"][:12], "holdout10": bench["holdout10"]}
    return model.eval(), tokenizer, data


def _config(tmp_path) -> dict:
    return {"seed": 0, "run_dir": str(tmp_path), "trial_id": "t", "model": {"prompt_template": TEMPLATE},
            "training": {"max_length": 96, "batch_size": 4, "lr": 3e-3},
            "robustness": {"relearn_fraction": 0.5, "relearn_epochs": 4, "relearn_lr": None},
            "benchmark": {"forget_split": "forget10", "retain_split": "retain90", "holdout_split": "holdout10"},
            "evaluation": {"generation": False, "utility_sets": False, "gradnorm": False, "batch_size": 16,
                           "every": 1, "gather_weights": True, "max_length": 96},
            "references": {"retain_stats": None, "target_model_utility": None}}


def test_relearning_half_the_forget_pairs_brings_the_other_half_back(unlearned, tmp_path):
    model, tokenizer, data = unlearned
    config = _config(tmp_path)
    rest, batches = _relearn_batches(config, tokenizer, data["forget10"])
    assert len(rest) == 6 and sum(len(b["input_ids"]) for b in batches) == 6  # half attacks, half is scored
    before = _evaluate_rest(config, type("Ctx", (), {})(), ModelScorer(model), tokenizer, data, rest)
    attacked, losses = relearn_copy(model, batches, 3e-3, 4)
    after = _evaluate_rest(config, None, ModelScorer(attacked.eval()), tokenizer, data, rest)
    assert losses[-1] < losses[0]
    assert after.metrics["forget_prob"] > before.metrics["forget_prob"] + 0.05  # the unseen half came back
    # the attack pairs never appear among the scored forget rows: exactly the rest, by index
    scored = {s["index"] for s in after.samples if s["split"] == "forget10"}
    assert scored == set(range(len(rest)))
    attack_questions = {data["forget10"][i]["question"] for i in range(len(data["forget10"])) if i not in rest}
    rest_questions = {data["forget10"][i]["question"] for i in rest}
    assert not attack_questions & rest_questions


@pytest.mark.integration
def test_a_sweep_trial_gets_a_row_per_probe_for_its_chosen_epoch(ray_local, tiny_cache, tmp_path):
    from orchestrator.api import run

    spec = parse_spec(tiny_spec(
        tiny_cache,
        training={"epochs": 2, "batch_size": 4, "max_length": 64, "warmup_epochs": 0},
        scaling={"num_workers": 2, "cpus_per_worker": 0.99, "zero_stage": 2},
        robustness={"probes": ["relearn", "int8", "int4"], "relearn_fraction": 0.5, "relearn_epochs": 2},
        sweep={"methods": [{"name": "graddiff", "space": {"lr": {"grid": [1e-3]}}}]},
    ))
    result = run(spec, run_dir=tmp_path / "run", log=lambda line: None)
    rows = [r for r in result.evals.to_pylist() if r["method"] == "graddiff"]
    own = [r for r in rows if r["probe"] is None]
    probed = {r["probe"]: r for r in rows if r["probe"]}
    assert [r["epoch"] for r in own] == [1, 2]
    assert set(probed) == {"relearn", "int8", "int4"}
    chosen = next(r for r in result.ranking.to_pylist() if r["method"] == "graddiff")
    assert {r["epoch"] for r in probed.values()} == {chosen["epoch"]}  # the epoch the ranking represents it by
    for row in probed.values():
        assert row["forget_prob"] is not None and row["forget_quality"] is not None
    # relearn scores the rest of the forget set, where the retain model's privleak AUC does not apply
    assert probed["relearn"]["privleak"] is None and "rest" in json.loads(probed["relearn"]["not_measured"])["privleak"]
    assert probed["int4"]["privleak"] is not None
    assert chosen["worst_probe"] in probed and (tmp_path / "run" / "report" / "robustness.png").exists()


def test_the_readmes_robustness_block_is_a_valid_spec_section():
    import re

    from tests.conftest import ROOT

    block, = [b for b in re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S) if "robustness:" in b]
    spec = parse_spec(tiny_spec("/tmp/unused-cache", robustness=yaml.safe_load(block)["robustness"]))
    assert spec.robustness.probes == ["relearn", "int8", "int4"] and spec.robustness.epochs == "best"
    assert spec.robustness.relearn_fraction == 0.1 and spec.robustness.relearn_epochs == 3


def test_a_resumed_trial_attacks_only_the_probes_it_has_no_row_for(tmp_path, monkeypatch):
    """run_probes on the chosen epoch: a probe whose evals row exists (written before the sweep was killed) is
    not redone; the others are attacked once each, from the kept checkpoint."""
    import types

    from orchestrator import probes
    from orchestrator.results import eval_file_name, write_evals

    config = {"run_dir": str(tmp_path), "trial_id": "ga_0001", "utility_ceiling": 0.1, "scaling": {"zero_stage": 2},
              "benchmark": {"forget_axis": "forget_quality"},
              "robustness": {"probes": ["relearn", "int8", "int4"], "epochs": "best"}}
    # Epoch 2 is the best under the ceiling (higher FQ, utility loss 0.05): the probes attack it.
    history = [{"epoch": 1, "forget_prob": 0.5, "forget_quality": 0.01, "utility_loss": 0.02},
               {"epoch": 2, "forget_prob": 0.2, "forget_quality": 0.30, "utility_loss": 0.05}]
    write_evals(tmp_path, [{"trial_id": "ga_0001", "method": "ga", "epoch": 2, "probe": "int8", "status": "ok"}],
                "ga_0001", 2, "int8")
    loaded, attacked = [], []

    class Engine:
        module = torch.nn.Linear(2, 2)

        def load_checkpoint(self, directory, tag, **kwargs):
            loaded.append(tag)

    kept = probes.probe_dir(config) / probes.PROBE_TAG
    kept.mkdir(parents=True)
    monkeypatch.setattr(probes, "_probe_and_write",
                        lambda cfg, ctx, method, state, probe, epoch, *rest: attacked.append((probe, epoch)))
    probes.run_probes(config, types.SimpleNamespace(rank=0), Engine(), None, None, None, history)
    assert attacked == [("relearn", 2), ("int4", 2)] and loaded == [probes.PROBE_TAG]
    assert (tmp_path / "evals" / eval_file_name("ga_0001", 2, "int8")).exists()
    assert not probes.probe_dir(config).exists()  # all probes written: the kept checkpoint is deleted

    for probe in ("relearn", "int4"):  # all three written: a second resume attacks nothing, loads nothing
        write_evals(tmp_path, [{"trial_id": "ga_0001", "method": "ga", "epoch": 2, "probe": probe, "status": "ok"}],
                    "ga_0001", 2, probe)
    attacked.clear(), loaded.clear()
    probes.run_probes(config, types.SimpleNamespace(rank=0), Engine(), None, None, None, history)
    assert attacked == [] and loaded == []


def test_the_forget_suite_scores_the_forget_side_as_the_full_suite_does_and_nothing_else(unlearned, tmp_path):
    """robustness.suite: forget leaves the forget / holdout metrics exactly as the full suite computes them
    and never runs a retain (or utility) example."""
    model, tokenizer, data = unlearned
    config = _config(tmp_path)
    rest = list(range(len(data["forget10"])))
    full = _evaluate_rest(config, None, ModelScorer(model), tokenizer, data, rest)
    config["robustness"]["suite"] = "forget"
    forget_only = _evaluate_rest(config, None, ModelScorer(model), tokenizer, data, rest)
    for name in ("forget_prob", "forget_truth_ratio", "mia_loss_auc", "mia_zlib_auc", "extraction_strength"):
        assert full.metrics[name] is not None and forget_only.metrics[name] == pytest.approx(full.metrics[name])
    assert full.metrics["retain_prob"] is not None and forget_only.metrics["retain_prob"] is None
    assert {s["split"] for s in forget_only.samples} == {"forget10", "holdout10"}
    assert "retain90" in {s["split"] for s in full.samples}


def test_the_probe_table_shows_each_probed_trial_before_and_after_each_probe():
    from orchestrator.probe_view import probe_table

    trial = {"run_id": "r", "trial_id": "npo_1", "method": "npo", "params": '{"lr": 5e-05}', "epoch": 2,
             "forget_quality": 0.25, "forget_prob": 0.31, "worst_probe": "int4"}
    unprobed = dict(trial, trial_id="ga_2", method="ga", worst_probe=None)
    rows = [dict(trial, probe=None),
            {"run_id": "r", "trial_id": "npo_1", "epoch": 2, "probe": "int4", "forget_quality": 0.0012, "forget_prob": 0.7},
            {"run_id": "r", "trial_id": "npo_1", "epoch": 2, "probe": "relearn", "forget_quality": None, "forget_prob": 0.5},
            {"run_id": "r", "trial_id": "npo_1", "epoch": 1, "probe": "int8", "forget_quality": 0.9, "forget_prob": 0.1}]
    table = probe_table(rows, [trial, unprobed]).splitlines()
    assert table[0] == ("| method | params | epoch | FQ | forget prob | FQ int4 | forget prob int4 | FQ relearn "
                        "| forget prob relearn | worst probe |")
    # epoch 1's int8 row attacks another epoch: not this trial's chosen one; ga has no probe rows at all
    assert table[2:] == ['| npo | {"lr": 5e-05} | 2 | 0.25 | 0.310 | 0.0012 | 0.700 | - | 0.500 | int4 |']
    assert probe_table(rows, [unprobed]) is None
