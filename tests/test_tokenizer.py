"""The byte-level BPE tokenizer trained on the embedded benchmark."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from orchestrator.data import generate_benchmark
from orchestrator.data.training import TEMPLATE_ANSWERS
from orchestrator.tokenizer import benchmark_texts, train_tokenizer


@pytest.fixture(scope="module")
def bench() -> dict:
    return generate_benchmark(seed=2, num_authors=20, questions_per_author=5)


@pytest.fixture(scope="module")
def texts(bench) -> list[str]:
    return benchmark_texts(bench)


@pytest.fixture(scope="module")
def tokenizer(texts):
    return train_tokenizer(texts, vocab_size=512)


def test_benchmark_texts_cover_every_kind_of_string(bench, texts):
    row = bench["forget10"][0]
    for text in [row["question"], row["answer"], row["paraphrased_question"], row["paraphrased_answer"],
                 *row["perturbed_answer"], bench["text_forget"][0]["text"], TEMPLATE_ANSWERS[-1],
                 f"Question: {row['question']}\nAnswer: "]:
        assert text in texts
    assert len(texts) == len(set(texts))
    assert f"Question: {row['question']}\nAnswer: " not in benchmark_texts(bench, prompt_template=None)


def test_round_trip_on_every_benchmark_string(tokenizer, texts):
    strings = texts + ["  odd  spacing ,and ünïcode ✓ .", "Answer: "]
    with_bos = tokenizer(strings, add_special_tokens=True)["input_ids"]
    assert tokenizer.batch_decode(with_bos, skip_special_tokens=True) == strings
    assert tokenizer.batch_decode(tokenizer(strings, add_special_tokens=False)["input_ids"]) == strings


def test_special_tokens_are_set_and_bos_is_prepended(tokenizer):
    assert tokenizer.convert_ids_to_tokens(
        [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    ) == ["<unk>", "<s>", "</s>", "<pad>"]
    assert len({tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 4
    with_bos = tokenizer("Who wrote it?", add_special_tokens=True)["input_ids"]
    without = tokenizer("Who wrote it?", add_special_tokens=False)["input_ids"]
    assert with_bos == [tokenizer.bos_token_id] + without
    assert tokenizer.eos_token_id not in with_bos


def test_training_is_deterministic_and_respects_the_vocab_size(tokenizer, texts):
    again = train_tokenizer(texts, vocab_size=512)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert len(tokenizer) <= 512
    sample = texts[:50]
    assert [again(t)["input_ids"] for t in sample] == [tokenizer(t)["input_ids"] for t in sample]
    # BPE merges shorten the benchmark's words: fewer tokens than UTF-8 bytes (+1 for <s>).
    assert sum(len(tokenizer(t)["input_ids"]) for t in sample) < 0.6 * sum(len(t.encode()) + 1 for t in sample)


def test_rejects_too_small_vocab_or_no_text():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["hello"], vocab_size=100)
    with pytest.raises(ValueError, match="at least one text"):
        train_tokenizer([], vocab_size=512)


def test_saved_tokenizer_loads_back_identically(tokenizer, tmp_path, texts):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.unk_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    for text in texts[:20] + ["a  b ."]:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
