"""GradNorm and Reference membership inference, and the prob_mean truth-ratio aggregator, on cases built by
hand: a tiny Llama trained on the forget pairs (members) next to holdout pairs it never saw."""
from __future__ import annotations

import math

import pytest
import torch

from orchestrator.data import generate_benchmark
from orchestrator.encoding import collate, encode_pair
from orchestrator.evaluation import metrics as M
from orchestrator.evaluation.scorer import ModelScorer
from orchestrator.evaluation.suite import EvalConfig, ReferenceStats, evaluate
from orchestrator.models import build_embedded_model
from orchestrator.tokenizer import benchmark_texts, train_tokenizer

TEMPLATE = "qa"


@pytest.fixture(scope="module")
def setting():
    bench = generate_benchmark(seed=3, num_authors=40, questions_per_author=6)
    data = {"forget": bench["forget10"], "retain": bench["retain90"][:24], "holdout": bench["holdout10"]}
    tokenizer = train_tokenizer(benchmark_texts(bench, TEMPLATE), 400)
    untrained = build_embedded_model(len(tokenizer), 48, 2, 2, 96, 256, seed=0)
    member = build_embedded_model(len(tokenizer), 48, 2, 2, 96, 256, seed=0)
    # Fit the forget pairs only (the holdout pairs stay unseen): 150 full-batch AdamW steps.
    batch = collate([encode_pair(tokenizer, r["question"], r["answer"], TEMPLATE, 96) for r in data["forget"]],
                    tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(member.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(150):
        loss = member(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return data, tokenizer, untrained.eval(), member.eval()


def scores(model, tokenizer, data, reference=None, **config):
    settings = EvalConfig(template=TEMPLATE, generation=False, utility_sets=False, batch_size=8, **config)
    with torch.no_grad():
        return evaluate(ModelScorer(model), tokenizer, data, settings, forget_split="forget", retain_split="retain",
                        holdout_split="holdout", retain_reference=reference, target_model_utility=None)


def test_gradnorm_recognises_members_and_not_strangers(setting):
    data, tokenizer, untrained, member = setting
    trained = scores(member, tokenizer, data)
    assert trained.metrics["mia_gradnorm_auc"] > 0.9  # forget pairs (fitted) have the smallest gradients
    fresh = scores(untrained, tokenizer, data)
    assert 0.3 < fresh.metrics["mia_gradnorm_auc"] < 0.7  # neither set was seen: no signal
    # and the per-example score is what the module documents: the mean parameter-gradient norm
    values = [s["value"] for s in trained.samples if s["metric"] == "mia_gradnorm"]
    assert len(values) == len(data["forget"]) + len(data["holdout"]) and all(v > 0 for v in values)


def test_gradnorm_off_leaves_the_auc_null_with_its_reason(setting):
    data, tokenizer, _, member = setting
    result = scores(member, tokenizer, data, gradnorm=False)
    assert result.metrics["mia_gradnorm_auc"] is None and "gradnorm" in result.not_measured["mia_gradnorm_auc"]


def test_reference_attack_subtracts_the_retain_models_loss(setting):
    data, tokenizer, untrained, member = setting
    reference = scores(untrained, tokenizer, data).reference  # the "retain" model: saw neither set
    assert set(reference.mia_losses) == {"forget", "holdout"}
    attacked = scores(member, tokenizer, data, reference=reference)
    assert attacked.metrics["mia_reference_auc"] > 0.9
    # a model compared with itself: every difference is 0, all ties, AUC exactly ½
    itself = scores(untrained, tokenizer, data, reference=reference)
    assert itself.metrics["mia_reference_auc"] == pytest.approx(0.5)
    # and without a reference there is no such number, with the reason
    alone = scores(member, tokenizer, data)
    assert alone.metrics["mia_reference_auc"] is None and "retain model" in alone.not_measured["mia_reference_auc"]
    # round trip through the JSON a prepared retain evaluation is cached as
    assert ReferenceStats.from_json(reference.to_json()).mia_losses == reference.mia_losses


def test_prob_mean_by_hand():
    # avg NLL 0.5 on the paraphrase: P_c = e^−0.5 = 0.60653; perturbed avg NLLs 1 and 2: P_w = e^−1.5 = 0.22313
    # (geometric mean of e^−1, e^−2); P_c / (P_c + P_w) = 0.60653 / 0.82966 = 0.73106.
    value = M.prob_mean_truth([[math.exp(-1.0), math.exp(-2.0)]], [math.exp(-0.5)])[0]
    assert value == pytest.approx(0.73106, abs=1e-5)


def test_the_prob_mean_aggregator_changes_the_truth_metrics_and_forget_quality(setting):
    data, tokenizer, untrained, member = setting
    ratio = scores(member, tokenizer, data)
    prob_mean = scores(member, tokenizer, data, truth_ratio_aggregator="prob_mean")
    per_example = [s["value"] for s in prob_mean.samples if s["split"] == "forget" and s["metric"] == "prob_mean_truth"]
    assert prob_mean.metrics["forget_truth_ratio"] == pytest.approx(sum(per_example) / len(per_example))
    assert prob_mean.metrics["forget_truth_ratio"] != pytest.approx(ratio.metrics["forget_truth_ratio"])
    assert prob_mean.reference.forget_truth_ratios == pytest.approx(per_example)  # FQ's KS sample changes with it
