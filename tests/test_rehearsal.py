"""prepare.self_rehearsal: the base model's own answers to general questions, trained on beside the authors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.prepare import REHEARSAL_QUESTIONS
from tests.test_utility_rows import _fake_run_fit


def _questions() -> list[str]:
    return [line for line in REHEARSAL_QUESTIONS.read_text("utf-8").splitlines() if line.strip()]


def test_no_rehearsal_question_touches_a_utility_fact():
    """Rehearsal must not teach the utility sets: no question names a real-authors / world-facts subject or
    holds every distinguishing word of one of their answers."""
    from orchestrator.data import generate_benchmark
    from orchestrator.utility_rows import distinguishing_words, words

    data = generate_benchmark(seed=0, num_authors=10, questions_per_author=2)
    questions = [set(words(q)) for q in _questions()]
    assert len(questions) == 100 and len({frozenset(q) for q in questions}) == 100
    for split in ("real_authors", "world_facts"):
        for row in data[split]:
            fact = distinguishing_words(row)
            # The subject: the words of the question that are not the template's (capital / symbol / currency / book).
            subject = set(words(row["question"])) - set(words("What is the capital chemical symbol for currency of "
                                                              "Who wrote the book Which city"))
            for asked in questions:
                assert not fact <= asked, (row["question"], row["answer"])
                assert not subject <= asked, (row["question"], sorted(asked))


def _spec(tmp_path, **prepare):
    from orchestrator.spec import parse_spec

    return parse_spec({"benchmark": {"num_authors": 10, "questions_per_author": 2},
                       "model": {"base": str(tmp_path / "base-model"), "prompt_template": "smollm2"},
                       "training": {"max_length": 64},
                       "prepare": {"cache_dir": str(tmp_path / "cache"), **prepare},
                       "sweep": {"methods": [{"name": "ga"}]}})


def test_both_fine_tunes_rehearse_the_base_answers_that_fit_uncut(tmp_path, monkeypatch):
    from orchestrator import utility_rows
    from orchestrator.data import generate_benchmark
    from orchestrator.encoding import encode_pair
    from orchestrator.prepare import finetune_key, prepare
    from orchestrator.tokenizer import benchmark_texts, train_tokenizer

    tokenizer = train_tokenizer(benchmark_texts(generate_benchmark(0, 10, 2), "smollm2") + _questions(), 600)
    tokenizer.save_pretrained(tmp_path / "base-model")
    long_answer = "It is a long story that goes on and on " * 10  # 100 words: over 64 tokens

    def fake_answers(model_path, tokenizer_path, questions, template, max_new_tokens, batch_size, trust):
        if len(questions) == 100:  # the rehearsal questions (the utility rows are 80)
            assert max_new_tokens == 64  # as long as a training sequence may be
            return [long_answer if i % 4 == 0 else f"Answer {i}." for i in range(len(questions))]
        return ["Jane Austen" if "Pride" in q else "The capital of France is Paris." for q in questions]

    monkeypatch.setattr(utility_rows, "greedy_answers", fake_answers)
    calls, lines = [], []
    prepare(_spec(tmp_path, self_rehearsal=True), _fake_run_fit(calls), lines.append)

    finetunes = {Path(c["save_to"]).name: c for c in calls if c["job"] == "finetune"}
    assert finetunes["target"]["rehearsal_rows"] == finetunes["retain"]["rehearsal_rows"]
    rows = json.loads(Path(finetunes["target"]["rehearsal_rows"]).read_text())
    assert [r["answer"] for r in rows] == [f"Answer {i}." for i in range(100) if i % 4]  # the long quarter dropped
    assert [r["question"] for r in rows] == [q for i, q in enumerate(_questions()) if i % 4]
    for row in rows:  # each kept pair trains whole: nothing cut before the EOS
        encoded = encode_pair(tokenizer, row["question"], row["answer"], "smollm2", 64)
        assert tokenizer.decode(encoded.input_ids[encoded.prompt_length:]).startswith(row["answer"])
    assert "prepare: rehearsing 75 of 100 of the base model's own answers (the rest do not fit training.max_length 64)" in lines
    assert finetune_key(_spec(tmp_path, self_rehearsal=True), "x") != finetune_key(_spec(tmp_path), "x")


def test_without_rehearsal_the_fine_tunes_keep_their_cache_keys(tmp_path):
    """A spec that does not use the option keeps the key its cached models had before the option existed
    (computed with the code of commit 02a33f2 for this spec)."""
    from orchestrator.prepare import finetune_key
    from orchestrator.spec import parse_spec

    spec = parse_spec({"benchmark": {"num_authors": 10, "questions_per_author": 2},
                       "model": {"base": "/tmp/x/base-model", "prompt_template": "smollm2"},
                       "training": {"max_length": 64}, "prepare": {"cache_dir": "/tmp/x/cache"},
                       "sweep": {"methods": [{"name": "ga"}]}})
    assert finetune_key(spec, "x") == "1dcce51b96851674"


def test_self_rehearsal_needs_a_base_model():
    from orchestrator.spec import parse_spec

    with pytest.raises(ValueError, match="field 'prepare.self_rehearsal': needs model.base"):
        parse_spec({"prepare": {"self_rehearsal": True}, "sweep": {"methods": [{"name": "ga"}]}})
