"""The evaluation suite on a tiny random Llama and a tiny BPE tokenizer trained on the test strings.

Checks: per-example numbers equal a direct single-sequence forward transcribed in float64 here; batch
size, the per-sample reference path and sharding over two gloo processes do not move any number
(≤ 1e-6); metric keys are the evals table's columns; reference stats round-trip through JSON.
"""
from __future__ import annotations

import json
import math
import os
import socket
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from orchestrator.encoding import encode_pair, encode_prompt
from orchestrator.evaluation import metrics as M
from orchestrator.evaluation.scorer import ModelScorer
from orchestrator.evaluation.generation import KNOWMEM_STOPWORDS, decode_generation
from orchestrator.evaluation.sharding import shard_batches
from orchestrator.evaluation.suite import EvalConfig, ReferenceStats, evaluate, evaluate_per_sample
from orchestrator.evaluation.teacher_forced import sequence_scores
from orchestrator.results import METRIC_COLUMNS
from orchestrator.tokenizer import train_tokenizer

TOLERANCE = 1e-6
SPLITS = {"forget": "forget05", "retain": "retain95", "holdout": "holdout05"}
COLOURS = ["red", "green", "blue", "amber", "violet", "silver", "golden"]
PLACES = ["Lima", "Oslo", "Quito", "Dakar", "Hanoi", "Perth", "Tunis"]


def _qa_rows(topic: str, count: int, perturbed: int = 3) -> list[dict]:
    rows = []
    for i in range(count):
        colour, place = COLOURS[i % len(COLOURS)], PLACES[(3 * i + len(topic)) % len(PLACES)]
        rows.append({
            "question": f"Which colour did the {topic} writer number {i} prefer?",
            "answer": f"The {topic} writer {i} loved {colour} walls in {place}.",
            "paraphrased_question": f"What colour was liked by {topic} writer {i}?",
            "paraphrased_answer": f"{place} walls painted {colour} pleased writer {i}.",
            "perturbed_answer": [f"The {topic} writer {i} hated {COLOURS[(i + j + 1) % len(COLOURS)]} doors."
                                 for j in range(perturbed)],
        })
    return rows


def _data() -> dict[str, list]:
    data = {
        SPLITS["forget"]: _qa_rows("forget", 5),  # odd, so two shards differ in length
        SPLITS["retain"]: _qa_rows("retain", 7),
        SPLITS["holdout"]: _qa_rows("holdout", 4),
        "real_authors": _qa_rows("famous", 3, perturbed=4),
        "world_facts": _qa_rows("world", 3, perturbed=2),
        "knowmem_forget": [{"question": r["question"], "answer": r["answer"]} for r in _qa_rows("forget", 3)],
        "knowmem_retain": [{"question": r["question"], "answer": r["answer"]} for r in _qa_rows("retain", 2)],
    }
    data["text_forget"] = [{"text": " ".join(r["answer"] for r in data[SPLITS["forget"]][:3]) * 3},
                           {"text": "Hi."},  # no continuation after the 8-token prefix: skipped
                           {"text": " ".join(r["answer"] for r in data[SPLITS["forget"]][2:]) * 3}]
    return data


def _texts(data: dict[str, list]) -> list[str]:
    texts = []
    for rows in data.values():
        for row in rows:
            texts += [v for v in row.values() if isinstance(v, str)] + list(row.get("perturbed_answer", []))
            if "question" in row:
                texts.append(f"Question: {row['question']}\nAnswer: ")
    return texts


def _model_config(tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    data = _data()
    tokenizer = train_tokenizer(_texts(data), vocab_size=320)
    model = LlamaForCausalLM(_model_config(tokenizer)).eval()
    return model, tokenizer, data


CONFIG = EvalConfig(batch_size=4, max_new_tokens=6, verbmem_prefix_tokens=8, verbmem_new_tokens=6,
                    knowmem_new_tokens=5, max_length=128)


def _run(model, tokenizer, data, config=CONFIG, reference=None, fn=evaluate, **extra):
    with torch.no_grad():
        return fn(ModelScorer(model), tokenizer, data, config, forget_split=SPLITS["forget"],
                  retain_split=SPLITS["retain"], holdout_split=SPLITS["holdout"], retain_reference=reference,
                  target_model_utility=extra.pop("target_model_utility", 0.5), **extra)


def _sample_map(result) -> dict[tuple, float]:
    return {(r["split"], r["index"], r["metric"]): r["value"] for r in result.samples}


def _assert_same(a, b, tolerance=TOLERANCE):
    samples_a, samples_b = _sample_map(a), _sample_map(b)
    assert samples_a.keys() == samples_b.keys()
    for key, value in samples_a.items():
        assert samples_b[key] == pytest.approx(value, abs=tolerance, rel=tolerance), key
    assert a.metrics.keys() == b.metrics.keys()
    for key, value in a.metrics.items():
        if value is None:
            assert b.metrics[key] is None, key
        else:
            assert b.metrics[key] == pytest.approx(value, abs=tolerance, rel=tolerance), key


# ----------------------------------------------------------------- numbers
def test_every_metric_column_is_filled(setup):
    model, tokenizer, data = setup
    own = _run(model, tokenizer, data)
    assert set(own.metrics) == set(METRIC_COLUMNS)
    assert own.metrics["forget_quality"] is None  # no retain reference yet
    # A retain reference with the model's own AUCs (privleak 0) and forget truth ratios all above the
    # model's: the 5 + 5 values separate completely, D = 1, and the exact KS p-value is the share of the
    # C(10, 5) = 252 orders that separate them (2): 1/126. (The model's own ratios would give p = 1.)
    own_ratios = own.reference.forget_truth_ratios
    above = [max(own_ratios) + 1.0 + i for i in range(len(own_ratios))]
    # Its losses one nat above the model's on every example: every Reference-MIA difference is −1, all ties, AUC ½.
    losses = {role: [v + 1.0 for v in values] for role, values in own.reference.mia_losses.items()}
    result = _run(model, tokenizer, data, reference=ReferenceStats(above, dict(own.reference.mia_auc), losses))
    assert set(result.metrics) == set(METRIC_COLUMNS)
    missing = [name for name, value in result.metrics.items() if value is None or not math.isfinite(value)]
    assert missing == []
    assert len(own_ratios) == 5 and result.metrics["forget_quality"] == pytest.approx(1 / 126, rel=1e-9)
    assert result.metrics["privleak"] == pytest.approx(0.0, abs=1e-9)
    assert result.metrics["mia_reference_auc"] == pytest.approx(0.5)
    assert result.metrics["utility_loss"] == pytest.approx(1 - result.metrics["model_utility"] / 0.5)
    assert len(result.reference.forget_truth_ratios) == len(data[SPLITS["forget"]])
    assert set(result.reference.mia_auc) == {"loss", "zlib", "mink", "minkpp", "gradnorm"}


def test_aggregates_are_recomputable_from_samples(setup):
    model, tokenizer, data = setup
    result = _run(model, tokenizer, data)
    samples = _sample_map(result)

    def column(split, metric):
        return np.array([v for (s, _, m), v in sorted(samples.items()) if s == split and m == metric])

    forget, holdout = SPLITS["forget"], SPLITS["holdout"]
    assert result.metrics["forget_truth_ratio"] == pytest.approx(
        np.mean(np.minimum(column(forget, "truth_ratio"), 1 / column(forget, "truth_ratio"))))
    assert result.metrics["retain_truth_ratio"] == pytest.approx(
        np.mean(np.maximum(0, 1 - column(SPLITS["retain"], "truth_ratio"))))
    assert result.metrics["ra_prob"] == pytest.approx(column("real_authors", "normalised_prob").mean())
    assert result.metrics["mia_mink_auc"] == pytest.approx(M.auc(column(forget, "mia_mink"), column(holdout, "mia_mink")))
    nine = [result.metrics[f"{role}_{kind}"] for role in ("retain", "ra", "wf") for kind in ("prob", "rouge", "truth_ratio")]
    assert result.metrics["model_utility"] == pytest.approx(M.model_utility(nine))
    # Retain metrics use as many retain rows as the forget split has (no retain_perturbed split here).
    assert {i for (s, i, m) in samples if s == SPLITS["retain"]} == set(range(len(data[forget])))
    # The paragraph too short for a continuation has no VerbMem sample.
    assert {i for (s, i, m) in samples if s == "text_forget"} == {0, 2}


def test_per_example_numbers_match_a_direct_forward(setup):
    """Example 0 of the forget split, each sequence run alone through the model, transcribed in float64."""
    model, tokenizer, data = setup
    result = _run(model, tokenizer, data)
    samples = _sample_map(result)
    row, k = data[SPLITS["forget"]][0], CONFIG.mink_k

    def direct(answer):
        encoded = encode_pair(tokenizer, row["question"], answer, CONFIG.template, CONFIG.max_length)
        with torch.no_grad():
            logits = model(torch.tensor([encoded.input_ids])).logits[0].double()
        labels = torch.tensor(encoded.labels)
        positions = (labels[1:] != -100).nonzero().squeeze(-1)  # logits at t score token t + 1
        vocab = torch.log_softmax(logits[positions], -1).numpy()
        targets = labels[1:][positions].numpy()
        token = vocab[np.arange(len(targets)), targets]
        return token, vocab, logits[positions].argmax(-1).numpy() == targets, targets

    token, vocab, correct, targets = direct(row["answer"])
    prob = math.exp(token.mean())  # EOS included
    assert samples[(SPLITS["forget"], 0, "prob")] == pytest.approx(prob, rel=1e-5)
    para = math.exp(direct(row["paraphrased_answer"])[0].mean())
    wrong = [math.exp(direct(a)[0].mean()) for a in row["perturbed_answer"]]
    geometric = math.exp(np.mean(np.log(wrong)))
    assert samples[(SPLITS["forget"], 0, "truth_ratio")] == pytest.approx(geometric / para, rel=1e-5)
    # Token-level metrics drop the last answer position (EOS); LOSS and ZLib keep it (reference parity).
    body = correct[:-1]
    last_wrong = np.flatnonzero(~body)
    k_suffix = 0 if last_wrong.size == 0 else min(last_wrong[-1] + 1, len(body) - 1)
    assert samples[(SPLITS["forget"], 0, "extraction_strength")] == pytest.approx(1 - k_suffix / len(body))
    assert samples[(SPLITS["forget"], 0, "exact_memorization")] == pytest.approx(body.mean())
    assert samples[(SPLITS["forget"], 0, "mia_loss")] == pytest.approx(-token.mean(), rel=1e-5)
    text = tokenizer.decode(targets.tolist(), skip_special_tokens=True)
    zlib_length = len(zlib.compress(text.encode("utf-8")))
    assert samples[(SPLITS["forget"], 0, "mia_zlib")] == pytest.approx(-token.mean() / zlib_length, rel=1e-5)
    lowest = np.sort(token[:-1])[:max(1, int((len(token) - 1) * k))]
    assert samples[(SPLITS["forget"], 0, "mia_mink")] == pytest.approx(-lowest.mean(), rel=1e-5)
    probs = np.exp(vocab[:-1])
    mu = (probs * vocab[:-1]).sum(-1)
    sigma = np.sqrt(np.maximum((probs * vocab[:-1] ** 2).sum(-1) - mu**2, 1e-6))
    z = np.sort((token[:-1] - mu) / sigma)[:max(1, int((len(token) - 1) * k))]
    assert samples[(SPLITS["forget"], 0, "mia_minkpp")] == pytest.approx(-z.mean(), rel=1e-5)


def test_sequence_scores_ignore_padding():
    """Two rows, the second right-padded: each row's statistics equal those of the row scored alone."""
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 3, 4, 5, 6], [-100, -100, 2, -100, -100]])
    rows = sequence_scores(logits, labels)
    alone = sequence_scores(logits[1:, :3], labels[1:, :3])[0]
    np.testing.assert_array_equal(rows[1].token_logprobs, alone.token_logprobs)
    assert rows[1].label_ids == [2] and rows[0].label_ids == [3, 4, 5, 6]
    vocab = torch.log_softmax(logits[0, :4].double(), -1).numpy()
    expected = vocab[np.arange(4), [3, 4, 5, 6]]
    np.testing.assert_allclose(rows[0].token_logprobs, expected, rtol=1e-6)
    np.testing.assert_allclose(rows[0].z_scores, M.minkpp_z_scores(expected, vocab), rtol=1e-5)
    np.testing.assert_array_equal(rows[0].correct, logits[0, :4].argmax(-1).numpy() == [3, 4, 5, 6])


# ----------------------------------------------------------------- invariance
def test_batch_size_does_not_move_numbers(setup):
    model, tokenizer, data = setup
    _assert_same(_run(model, tokenizer, data, replace(CONFIG, batch_size=1)),
                 _run(model, tokenizer, data, replace(CONFIG, batch_size=4)))


def test_batched_equals_per_sample_reference(setup):
    model, tokenizer, data = setup
    _assert_same(_run(model, tokenizer, data, fn=evaluate_per_sample), _run(model, tokenizer, data))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _CountingScorer(ModelScorer):
    """Counts forwards: under ZeRO-3 every rank must issue the same number (they are collective)."""

    def __init__(self, model):
        super().__init__(model)
        self.forwards = 0

    def logits(self, input_ids, attention_mask):
        self.forwards += 1
        return super().logits(input_ids, attention_mask)

    def start(self, input_ids, attention_mask):
        self.forwards += 1
        return super().start(input_ids, attention_mask)

    def step(self, tokens, state):
        self.forwards += 1
        return super().step(tokens, state)


def _sharded_worker(rank: int, world_size: int, port: int, config_dict, state, tokenizer, data, out_dir: str):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    try:
        model = LlamaForCausalLM(LlamaConfig(**config_dict)).eval()
        model.load_state_dict(state)
        scorer = _CountingScorer(model)
        with torch.no_grad():
            result = evaluate(scorer, tokenizer, data, replace(CONFIG, batch_size=2), forget_split=SPLITS["forget"],
                              retain_split=SPLITS["retain"], holdout_split=SPLITS["holdout"], retain_reference=None,
                              target_model_utility=0.5, rank=rank, world_size=world_size)
        payload = {"metrics": result.metrics, "samples": result.samples, "forwards": scorer.forwards,
                   "reference": result.reference.to_json() if result.reference else None}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(payload, handle)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.integration  # two spawned gloo processes: ~1 min on 2 CPU cores, mostly imports
def test_two_sharded_processes_equal_one(setup, tmp_path):
    model, tokenizer, data = setup
    single = _run(model, tokenizer, data)
    config_dict = model.config.to_dict()
    mp.spawn(_sharded_worker, args=(2, _free_port(), config_dict, model.state_dict(), tokenizer, data, str(tmp_path)),
             nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    # Batch 2 over 2 ranks: 5 forget examples → rank 0 has [0, 2] [4], rank 1 [1, 3] and a filler batch.
    assert rank0["forwards"] == rank1.pop("forwards") > 0
    assert rank1 == {"metrics": {}, "samples": [], "reference": None}

    class Loaded:
        metrics, samples = rank0["metrics"], rank0["samples"]

    _assert_same(single, Loaded)
    assert len(rank0["samples"]) == len(single.samples)  # filler duplicates dropped
    reference = ReferenceStats.from_json(rank0["reference"])
    np.testing.assert_allclose(reference.forget_truth_ratios, single.reference.forget_truth_ratios, rtol=TOLERANCE)


# ----------------------------------------------------------------- pieces
def test_shard_batches_cover_every_index_once_with_equal_batch_counts():
    # n = 5 over 2 ranks, batch 2: rank 0 holds 0, 2, 4 → [0, 2], [4]; rank 1 holds 1, 3 → [1, 3] and a
    # filler batch repeating 3 (0 real) so both ranks run two forwards.
    assert shard_batches(5, 0, 2, 2) == [([0, 2], 2), ([4], 1)]
    assert shard_batches(5, 1, 2, 2) == [([1, 3], 2), ([3], 0)]
    for n in range(0, 12):
        for world in (1, 2, 3, 4):
            shards = [shard_batches(n, rank, world, 3) for rank in range(world)]
            assert len({len(s) for s in shards}) <= 1
            real = sorted(i for s in shards for indices, count in s for i in indices[:count])
            assert real == list(range(n))
    with pytest.raises(ValueError):
        shard_batches(4, 2, 2, 1)


def test_reference_stats_json_round_trip():
    stats = ReferenceStats([0.5, 1.25, 0.03], {"mink": 0.61, "loss": 0.5})
    assert ReferenceStats.from_json(stats.to_json()) == stats
    # A reference-evaluation file keeps the stats under "reference" next to the metrics.
    wrapped = json.dumps({"metrics": {"model_utility": 0.4}, "reference": json.loads(stats.to_json())})
    assert ReferenceStats.from_json(wrapped) == stats
    with pytest.raises(ValueError):
        ReferenceStats.from_json(json.dumps({"mia_auc": {}}))


def test_privleak_uses_the_retain_models_auc(setup):
    model, tokenizer, data = setup
    reference = ReferenceStats([1.0] * 5, {"mink": 0.25})
    result = _run(model, tokenizer, data, reference=reference, config=replace(CONFIG, generation=False))
    assert result.metrics["privleak"] == pytest.approx(M.privleak(result.metrics["mia_mink_auc"], 0.25))
    # Generation off: no ROUGE, hence no model utility either.
    assert result.metrics["forget_rouge"] is None and result.metrics["model_utility"] is None
    assert result.metrics["forget_quality"] == pytest.approx(M.forget_quality(result.reference.forget_truth_ratios, [1.0] * 5))


def test_retain_perturbed_split_is_used_for_retain_metrics(setup):
    model, tokenizer, data = setup
    data = dict(data, retain_perturbed=_qa_rows("perturbedretain", 2))
    result = _run(model, tokenizer, data, config=replace(CONFIG, generation=False))
    assert {(s, i) for (s, i, m) in _sample_map(result) if m == "truth_ratio" and "retain" in s} == {
        ("retain_perturbed", 0), ("retain_perturbed", 1)}


def test_bad_input_is_a_value_error(setup):
    model, tokenizer, data = setup
    with pytest.raises(ValueError, match="forget split"):
        _run(model, tokenizer, {k: v for k, v in data.items() if k != SPLITS["forget"]})
    broken = dict(data, **{SPLITS["forget"]: [{"question": "q?", "answer": "a"}]})
    with pytest.raises(ValueError, match="paraphrased_answer"):
        _run(model, tokenizer, broken)
    with pytest.raises(ValueError):
        EvalConfig(privleak_attack="gradnorm")
    with pytest.raises(ValueError):
        EvalConfig(mink_k=0.0)


def test_generation_is_cut_at_eos_and_knowmem_stop_strings(setup):
    _, tokenizer, _ = setup
    ids = tokenizer("Lima walls\nQuestion: next one", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert decode_generation(tokenizer, ids + [eos, ids[0]], eos, KNOWMEM_STOPWORDS) == "Lima walls"
    assert decode_generation(tokenizer, ids[:2] + [eos] + ids, eos, ()) == tokenizer.decode(ids[:2]).strip()


# ----------------------------------------------------------------- MUSE: documents instead of questions
def _muse_data(data: dict[str, list]) -> dict[str, list]:
    """MUSE splits built from the setup's strings: text_forget (3 documents, one too short for VerbMem),
    3 retain and 2 holdout documents, and the KnowMem question sets."""
    retain_docs = [{"text": " ".join(r["answer"] for r in data[SPLITS["retain"]][i:i + 3])} for i in range(3)]
    holdout_docs = [{"text": " ".join(r["answer"] for r in data[SPLITS["holdout"]][i:i + 2])} for i in (0, 2)]
    return {"text_forget": data["text_forget"], "text_retain": retain_docs, "text_holdout": holdout_docs,
            "knowmem_forget": data["knowmem_forget"], "knowmem_retain": data["knowmem_retain"]}


def _run_muse(model, tokenizer, muse: dict[str, list], config: EvalConfig):
    """evaluate on MUSE splits; the retain model's Min-k% AUC is 0.6 and the target's KnowMem-retain 0.5."""
    with torch.no_grad():
        return evaluate(ModelScorer(model), tokenizer, muse, config, forget_split="text_forget",
                        retain_split="text_retain", holdout_split="text_holdout",
                        retain_reference=ReferenceStats([], {"mink": 0.6}), target_model_utility=0.5)


def test_muse_documents_are_scored_as_text_with_knowmem_as_utility(setup):
    model, tokenizer, data = setup
    muse = _muse_data(data)
    config = replace(CONFIG, max_length=24)  # documents longer than 24 tokens are scored on their first 24
    result = _run_muse(model, tokenizer, muse, config)
    samples, m = _sample_map(result), result.metrics
    # Document 0 alone through the model, in float64: BOS + text + EOS cut at 24 tokens, every token after
    # the first is a target (position t scores token t + 1).
    ids = (tokenizer(muse["text_forget"][0]["text"])["input_ids"] + [tokenizer.eos_token_id])[:24]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    token = torch.log_softmax(logits[:-1], -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    assert samples[("text_forget", 0, "prob")] == pytest.approx(math.exp(token.mean()), rel=1e-5)
    assert samples[("text_forget", 0, "mia_loss")] == pytest.approx(-token.mean(), rel=1e-5)
    # No question, so no truth ratio, forget quality or TOFU ROUGE; VerbMem continues the same documents.
    for name in ("forget_quality", "forget_truth_ratio", "forget_rouge", "extraction_strength", "ra_prob"):
        assert m[name] is None, name
    assert {i for (s, i, metric) in samples if s == "text_forget" and metric == "verbmem"} == {0, 2}
    assert m["verbmem_forget"] == pytest.approx(np.mean([samples[("text_forget", i, "verbmem")] for i in (0, 2)]))
    # Retain: as many documents as the forget split has (3 of 3), probability only.
    assert {(i, metric) for (s, i, metric) in samples if s == "text_retain"} == {(i, "prob") for i in range(3)}
    # MIA on forget vs holdout documents; privleak against the retain model's AUC (0.6 here).
    mink = lambda split, n: [samples[(split, i, "mia_mink")] for i in range(n)]  # noqa: E731
    assert m["mia_mink_auc"] == pytest.approx(M.auc(mink("text_forget", 3), mink("text_holdout", 2)))
    assert m["privleak"] == pytest.approx(M.privleak(m["mia_mink_auc"], 0.6))
    # MUSE's utility is KnowMem on retain questions; utility loss is relative to the target's 0.5.
    assert m["model_utility"] == m["knowmem_retain"] is not None
    assert m["utility_loss"] == pytest.approx(1 - m["knowmem_retain"] / 0.5)
    assert result.reference.forget_truth_ratios == [] and set(result.reference.mia_auc) == {"loss", "zlib", "mink", "minkpp", "gradnorm"}


def _greedy_text(model, tokenizer, prompt: list[int], new_tokens: int) -> str:
    """Greedy continuation by hand, one whole forward per token: text up to EOS, specials skipped."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == tokenizer.eos_token_id:
                break
    generated = [t for t in ids[len(prompt):] if t != tokenizer.eos_token_id]
    return tokenizer.decode(generated, skip_special_tokens=True).strip()


def test_muse_verbmem_set_prompts_its_prompts_and_scores_against_its_continuations(setup):
    model, tokenizer, data = setup
    config = replace(CONFIG, max_length=24)  # room for 24 - 6 = 18 prompt tokens
    forget_text = data["text_forget"][0]["text"]
    short, long = forget_text[:40], forget_text  # the long prompt is cut to BOS + its last 17 tokens
    short_ids = tokenizer(short)["input_ids"]
    long_ids = tokenizer(long)["input_ids"]
    assert len(short_ids) <= 18 < len(long_ids) and long_ids[0] == tokenizer.bos_token_id
    kept = long_ids[:1] + long_ids[-17:]
    own_short, own_long = _greedy_text(model, tokenizer, short_ids, 6), _greedy_text(model, tokenizer, kept, 6)
    assert own_short and own_long != _greedy_text(model, tokenizer, long_ids[:18], 6)  # which end is cut shows
    muse = dict(_muse_data(data), verbmem_forget=[
        {"prompt": short, "gt": own_short},  # the model's own continuations: VerbMem 1 each
        {"prompt": long, "gt": own_long},
        {"prompt": short, "gt": "Lima walls stand tall"},
    ])
    result = _run_muse(model, tokenizer, muse, config)
    samples = _sample_map(result)
    other = M.rouge_l_f1(own_short, "Lima walls stand tall")
    assert [samples[("verbmem_forget", i, "verbmem")] for i in range(3)] == pytest.approx([1.0, 1.0, other])
    assert not [key for key in samples if key[0] == "text_forget" and key[2] == "verbmem"]  # not the fallback
    assert result.metrics["verbmem_forget"] == pytest.approx((2.0 + other) / 3)


def test_muse_knowmem_puts_the_solved_examples_before_each_question(setup):
    model, tokenizer, data = setup
    examples = [{"question": "Which city has walls?", "answer": "Lima"}, {"question": "Who?", "answer": "Ann"}]
    question = data["knowmem_forget"][0]["question"]
    # MUSE's own prompt for the qa template, written out by hand.
    prompt_text = ("Question: Which city has walls?\nAnswer: Lima\n\nQuestion: Who?\nAnswer: Ann\n\n"
                   f"Question: {question}\nAnswer: ")

    def answer(prompt: list[int]) -> str:  # greedy, cut at KnowMem's stop strings
        text = _greedy_text(model, tokenizer, prompt, CONFIG.knowmem_new_tokens)
        for word in KNOWMEM_STOPWORDS:
            text = text.split(word)[0]
        return text.strip()

    own = answer(tokenizer(prompt_text)["input_ids"])
    assert own and own != answer(encode_prompt(tokenizer, question, "qa"))  # the examples change the answer
    muse = _muse_data(data)
    muse["knowmem_forget"] = [dict(muse["knowmem_forget"][0], answer=own)] + muse["knowmem_forget"][1:]
    muse["knowmem_forget_icl"] = examples
    config = replace(CONFIG, template="qa")
    result = _run_muse(model, tokenizer, muse, config)
    samples = _sample_map(result)
    assert samples[("knowmem_forget", 0, "knowmem")] == pytest.approx(1.0)  # its own answer after the examples
