"""``benchmark.kind: muse``: the spec's defaults and refusals, how prepare and the sweep score use it, and
one tiny MUSE-mode sweep end to end on a local Ray (the embedded text corpus, offline)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from methods.base import ModelOutput, nll
from orchestrator.encoding import collate, encode_text
from orchestrator.spec import SpecError, parse_spec
from tests.conftest import tiny_spec

GA = {"methods": [{"name": "ga"}]}


def muse_spec(**benchmark) -> dict:
    return {"benchmark": {"kind": "muse", **benchmark}, "sweep": GA}


# ---------------------------------------------------------------- spec
def test_split_defaults_follow_the_kind():
    tofu = parse_spec({"sweep": GA}).benchmark
    muse = parse_spec(muse_spec()).benchmark
    assert (tofu.kind, tofu.forget_split, tofu.retain_split, tofu.holdout_split) == ("tofu", "forget10", "retain90", "holdout10")
    assert (muse.forget_split, muse.retain_split, muse.holdout_split) == ("text_forget", "text_retain", "text_holdout")
    # Splits given explicitly are kept (holdout and retain swapped is odd but a text split each).
    assert parse_spec(muse_spec(retain_split="text_holdout")).benchmark.retain_split == "text_holdout"


@pytest.mark.parametrize("spec, field, words", [
    (dict(muse_spec(), sweep={"methods": [{"name": "ga"}, {"name": "flat"}]}), "sweep.methods[1].name", "question/answer rows"),
    (dict(muse_spec(), sweep={"methods": [{"name": "idkdpo"}]}), "sweep.methods[0].name", "splits template"),
    (dict(muse_spec(), sweep={"methods": [{"name": "uld"}]}), "sweep.methods[0].name", "forget_augmented"),
    (muse_spec(forget_split="forget10"), "benchmark.forget_split", "text splits"),
    (muse_spec(text_corpus=False), "benchmark.text_corpus", "text corpus"),
    (dict(muse_spec(), sweep={**GA, "metric": "log10_forget_quality"}), "sweep.metric", "no forget quality"),
    (dict(muse_spec(), sweep={**GA, "search": "optuna", "multi_objective": True}), "sweep.multi_objective", "forget quality"),
    ({"benchmark": {"kind": "wmdp"}, "sweep": GA}, "benchmark.kind", "'tofu' or 'muse'"),
])
def test_invalid_muse_combinations_are_one_line_naming_the_field(spec, field, words):
    with pytest.raises(SpecError) as error:
        parse_spec(spec, "job.yaml")
    message = str(error.value)
    assert message.startswith(f"job.yaml: field '{field}': ") and words in message and "\n" not in message


def test_the_muse_jobs_parse_whole():
    from orchestrator.spec import load_spec
    from tests.conftest import ROOT

    news = load_spec(ROOT / "jobs" / "muse_news.yaml")
    embedded = load_spec(ROOT / "jobs" / "muse_embedded.yaml")
    assert news.benchmark.kind == embedded.benchmark.kind == "muse"
    assert [m.name for m in embedded.sweep.methods] == ["ga", "graddiff", "npo"]
    assert "NEEDS" not in (ROOT / "jobs" / "muse_news.yaml").read_text()


# ---------------------------------------------------------------- prepare and the sweep's score
def test_prepare_trains_the_embedded_references_on_text_and_knowmem():
    from orchestrator.prepare import benchmark_config, reference_training_splits

    spec = parse_spec(muse_spec())
    assert reference_training_splits(spec) == {
        "retain": ["text_retain", "knowmem_retain"],
        "target": ["text_forget", "text_retain", "knowmem_forget", "knowmem_retain"]}
    assert benchmark_config(spec)["generator"] == {"seed": 0, "num_authors": 100, "questions_per_author": 8, "kind": "muse"}
    hub = parse_spec(muse_spec(source="muse-bench/MUSE-News"))
    assert benchmark_config(hub)["generator"] == {"kind": "muse"}  # every split load_muse knows
    # TOFU's worker config is what it was before the kind existed (its evaluation cache keys too).
    assert "kind" not in benchmark_config(parse_spec({"sweep": GA}))["generator"]


def test_muse_score_is_minus_verbmem_minus_the_utility_penalty():
    from orchestrator.scores import score

    metrics = {"forget_quality": None, "verbmem_forget": 0.25, "utility_loss": 0.05}
    assert score(metrics, 10.0, "verbmem") == pytest.approx(-0.25 - 10.0 * 0.05)
    assert score(dict(metrics, utility_loss=-0.2), 10.0, "verbmem") == pytest.approx(-0.25)  # a gain is not rewarded
    assert score(dict(metrics, verbmem_forget=None), 10.0, "verbmem") is None
    assert score(metrics, 10.0) is None  # TOFU's score needs forget quality
    assert score({"forget_quality": 1e-3, "utility_loss": 0.1}, 10.0) == pytest.approx(-3 - 1)
    # TOFU without a retain model: the forget-answer probability (lower is better) is the forget axis
    assert score({"forget_prob": 0.4, "utility_loss": 0.1}, 10.0, "forget_prob") == pytest.approx(-0.4 - 1)


def test_a_chunk_batch_trains_on_every_token_after_the_first():
    """GA / GradDiff / NPO ... consume ModelOutput labels: on chunks, NLL is the mean over positions 1..T−1
    (float64 transcription of the cross-entropy below; padding is IGNORE_INDEX)."""

    class Words:
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1] + [5 + len(w) for w in text.split()]}

    chunks = encode_text(Words(), "aa b ccc dd e", 4) + encode_text(Words(), "x", 4)  # [1,7,6,8] [7,6,2]; [1,6,2]
    batch = collate(chunks, pad_token_id=0)
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 12)
    expected, count = 0.0, 0
    for row, chunk in enumerate(chunks):
        logprobs = torch.log_softmax(logits[row].double(), -1)
        for t in range(len(chunk.input_ids) - 1):
            expected -= float(logprobs[t, chunk.input_ids[t + 1]])
            count += 1
    assert count == 3 + 2 + 2
    out = ModelOutput(logits, batch["labels"], batch["attention_mask"], None)
    assert float(nll(out)) == pytest.approx(expected / count, rel=1e-6)


# ---------------------------------------------------------------- end to end
@pytest.mark.integration
def test_tiny_muse_sweep_fills_verbmem_knowmem_and_privleak(ray_local, tiny_cache, tmp_path):
    from orchestrator.api import run

    base = tiny_spec(tiny_cache / "muse")  # own cache: the TOFU tests' models are trained on other data
    spec = parse_spec(dict(
        base,
        benchmark={"kind": "muse", "source": "embedded", "num_authors": 20, "questions_per_author": 3},
        # 32 short examples (20 biographies + 12 questions): 4 epochs leave KnowMem at 0 and utility loss
        # undefined; 40 (80 steps, ~3 s) make the target answer (KnowMem-retain ≈ 0.8 measured).
        prepare=dict(base["prepare"], epochs=40, num_workers=1),  # one evaluation gang process: less startup
        training=dict(base["training"], epochs=1),
        scaling=dict(base["scaling"], num_workers=1),
        evaluation=dict(base["evaluation"], every=0),
        sweep={"methods": [{"name": "ga", "space": {"lr": {"grid": [1e-3]}}}]},
    ))
    result = run(spec, run_dir=tmp_path / "run", log=lambda line: None)
    rows = {row["method"]: row for row in result.evals.to_pylist()}
    assert set(rows) == {"target", "retain", "ga"}
    for method, row in rows.items():
        for column in ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak", "mia_mink_auc", "model_utility"):
            if (method, column) != ("retain", "privleak"):
                assert row[column] is not None and math.isfinite(row[column]), (method, column)
        assert row["forget_quality"] is None, method  # no truth ratio on text
    assert rows["target"]["model_utility"] == rows["target"]["knowmem_retain"] and rows["target"]["utility_loss"] == 0.0
    assert rows["ga"]["utility_loss"] == pytest.approx(1 - rows["ga"]["knowmem_retain"] / rows["target"]["knowmem_retain"])
    # The retain model is privleak's reference: 0 against itself by definition, so null with the reason.
    assert rows["retain"]["privleak"] is None
    assert "reference" in json.loads(rows["retain"]["not_measured"])["privleak"]
    assert rows["ga"]["status"] == "ok" and rows["ga"]["epoch"] == 1
    ranked = result.ranking.to_pylist()
    assert ranked[0]["method"] == "ga" and ranked[0]["rank"] == 1
