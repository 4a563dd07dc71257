"""The embedded benchmark generator, loaders, validation errors and the UnlearningDataset."""
from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from methods.base import SPLITS
from orchestrator import data
from orchestrator.data import (
    DataError,
    check_splits,
    generate_benchmark,
    load_benchmark,
    load_directory,
    validate_split,
    validate_text_split,
)
from orchestrator.data.embedded import AUTHOR_FACTS
from orchestrator.data.training import BATCH_SPLITS, TEMPLATE_ANSWERS, UnlearningDataset, collate_splits, training_rows
from orchestrator.encoding import IGNORE_INDEX, encode_pair, encode_text

M_ = IGNORE_INDEX
from orchestrator.tokenizer import benchmark_texts, train_tokenizer

QA_FIELDS = {"id", "question", "answer", "paraphrased_question", "paraphrased_answer", "perturbed_answer"}
AUTHOR_SPLITS = [f"{kind}{p}" for p in ("01", "05", "10") for kind in ("forget", "holdout")] + [
    "retain99", "retain95", "retain90", "full"
]


@pytest.fixture(scope="module")
def bench() -> dict:
    return generate_benchmark(seed=0, num_authors=100, questions_per_author=8)


@pytest.fixture(scope="module")
def small() -> dict:
    return generate_benchmark(seed=3, num_authors=20, questions_per_author=4)


@pytest.fixture(scope="module")
def tokenizer(small):
    return train_tokenizer(benchmark_texts(small), vocab_size=512)


def authors(rows) -> set[int]:
    return {row["author"] for row in rows}


# ---------------------------------------------------------------- generator
def test_generator_is_deterministic_and_depends_on_seed():
    first = generate_benchmark(seed=7, num_authors=12, questions_per_author=5)
    assert first == generate_benchmark(seed=7, num_authors=12, questions_per_author=5)
    other = generate_benchmark(seed=8, num_authors=12, questions_per_author=5)
    assert [r["answer"] for r in first["full"]] != [r["answer"] for r in other["full"]]


def test_every_split_has_the_tofu_schema(bench):
    for name in AUTHOR_SPLITS + ["real_authors", "world_facts", "utility_train"]:
        validate_split(bench[name], name, require_perturbed=True)
        for row in bench[name]:
            assert QA_FIELDS <= set(row), name
            assert len(row["perturbed_answer"]) == 3
            assert isinstance(row.get("author", 0), int)
    for name in ("text_forget", "text_retain", "text_holdout"):
        validate_text_split(bench[name], name)
    for name in ("knowmem_forget", "knowmem_retain"):
        validate_split(bench[name], name, require_perturbed=False)


def test_ids_are_unique_across_all_generated_rows(bench):
    ids = [row["id"] for name in ("full", "holdout10", "utility_train") for row in bench[name]]
    assert len(ids) == len(set(ids)) == 100 * 8 + 10 * 8 + 80


def test_each_author_has_a_unique_name(bench):
    # The birthplace question is "Where was {name} born?": recover the name from it.
    names = [re.fullmatch(r"Where was (.+) born\?", row["question"]).group(1)
             for row in bench["full"] + bench["holdout10"] if row["id"].endswith("-birthplace")]
    assert len(names) == 110 and len(set(names)) == 110


@pytest.mark.parametrize("num_authors, sizes", [
    # Authors per forget01/05/10: round(N·p/100) half up, at least 1, at most N − 1 (worked by hand).
    (100, (1, 5, 10)), (20, (1, 1, 2)), (25, (1, 1, 3)), (2, (1, 1, 1)),
])
def test_split_sizes_and_disjointness(num_authors, sizes):
    bench = generate_benchmark(seed=1, num_authors=num_authors, questions_per_author=2)
    full_authors = authors(bench["full"])
    assert full_authors == set(range(num_authors)) and len(bench["full"]) == 2 * num_authors
    for percent, size in zip(("01", "05", "10"), sizes):
        forget, retain = bench[f"forget{percent}"], bench[f"retain{100 - int(percent)}"]
        holdout = bench[f"holdout{percent}"]
        assert authors(forget) == set(range(num_authors - size, num_authors))  # the LAST authors
        assert authors(forget).isdisjoint(authors(retain))
        assert retain + forget == bench["full"]
        assert len(holdout) == len(forget) and authors(holdout).isdisjoint(full_authors)


def test_generator_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_authors"):
        generate_benchmark(num_authors=1)
    with pytest.raises(ValueError, match="questions_per_author"):
        generate_benchmark(questions_per_author=len(AUTHOR_FACTS) + 1)


def test_perturbed_answers_are_distinct_wrong_answers(bench):
    for name in ("full", "holdout10", "real_authors", "world_facts"):
        for row in bench[name]:
            wrong = row["perturbed_answer"]
            assert len(set(wrong)) == 3
            assert row["answer"] not in wrong and row["paraphrased_answer"] not in wrong


def test_answers_are_short_sentences(bench):
    for row in bench["full"] + bench["utility_train"]:
        for text in [row["answer"], row["paraphrased_answer"], *row["perturbed_answer"]]:
            assert 5 <= len(text.split()) <= 18 and text.endswith("."), text


def test_utility_sets_are_fixed_facts_outside_the_author_data(bench, small):
    assert len(bench["real_authors"]) == 40 and len(bench["world_facts"]) == 40
    assert bench["utility_train"] == bench["real_authors"] + bench["world_facts"]
    assert [r["answer"] for r in bench["world_facts"]] == [r["answer"] for r in small["world_facts"]]
    assert {r["id"] for r in bench["utility_train"]}.isdisjoint(r["id"] for r in bench["full"])


def test_corpus_has_one_biography_per_author_built_from_its_answers(bench):
    assert [r["author"] for r in bench["text_forget"]] == sorted(authors(bench["forget10"]))
    assert [r["author"] for r in bench["text_holdout"]] == sorted(authors(bench["holdout10"]))
    assert [r["author"] for r in bench["text_retain"]] == sorted(authors(bench["retain90"]))
    biography = {r["author"]: r["text"] for r in bench["text_forget"]}
    for row in bench["forget10"]:
        assert row["answer"] in biography[row["author"]]
    assert [r["question"] for r in bench["knowmem_forget"]] == [r["question"] for r in bench["forget10"]]
    # knowmem_retain: as many retain authors as the forget split has (10 of 100), the first ones.
    assert authors(bench["knowmem_retain"]) == set(range(10))


# ---------------------------------------------------------------- loaders
def test_load_embedded_equals_the_generator_and_selects_splits(small):
    assert load_benchmark("embedded", seed=3, num_authors=20, questions_per_author=4) == small
    chosen = load_benchmark("embedded", seed=3, num_authors=20, questions_per_author=4, splits=["forget05"])
    assert chosen == {"forget05": small["forget05"]}
    with pytest.raises(DataError, match="'nope'"):
        load_benchmark("embedded", num_authors=20, questions_per_author=4, splits=["nope"])


def write_split(path, rows, fmt):
    if fmt == "json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet"])
def test_directory_loader_reads_back_what_was_written(tmp_path, small, fmt):
    for name, rows in small.items():
        write_split(tmp_path / f"{name}.{fmt}", rows, fmt)
    assert load_directory(tmp_path) == small
    assert load_benchmark(str(tmp_path), splits=["forget10", "text_forget"]) == {
        "forget10": small["forget10"], "text_forget": small["text_forget"]}


def test_directory_without_split_files_or_with_a_missing_split(tmp_path):
    with pytest.raises(DataError, match="no .json, .jsonl or .parquet"):
        load_directory(tmp_path)
    write_split(tmp_path / "forget10.jsonl", [{"question": "q?", "answer": "a."}], "jsonl")
    with pytest.raises(DataError, match="split 'retain90' not found"):
        load_directory(tmp_path, ["forget10", "retain90"])
    with pytest.raises(DataError, match="no such directory"):
        load_benchmark(str(tmp_path / "absent"))
    with pytest.raises(DataError, match="is a file"):
        load_benchmark(str(tmp_path / "forget10.jsonl"))


GOOD = {"id": "r0", "question": "Who?", "answer": "Someone.", "paraphrased_answer": "It is someone.",
        "perturbed_answer": ["Nobody.", "Anyone."]}


def rows_with(index: int, **changes) -> list[dict]:
    """Three valid rows with unique ids; row ``index`` altered (a value of None deletes the field)."""
    rows = [dict(GOOD, id=f"r{i}") for i in range(3)]
    for field, value in changes.items():
        if value is None:
            del rows[index][field]
        else:
            rows[index][field] = value
    return rows


@pytest.mark.parametrize("fmt, rows, row, field, problem", [
    # JSONL reports the 1-based line, JSON and Parquet the 0-based index of the row.
    ("jsonl", rows_with(1, answer=None), 2, "answer", "missing"),
    ("json", rows_with(1, question=5), 1, "question", "expected a string, got int"),
    ("parquet", rows_with(2, answer="  "), 2, "answer", "empty string"),
    ("json", rows_with(0, perturbed_answer="Nobody."), 0, "perturbed_answer", "expected a list of strings, got str"),
    ("jsonl", rows_with(2, perturbed_answer=["x", ""]), 3, "perturbed_answer", "item 1 is not a non-empty string"),
    ("jsonl", rows_with(1, perturbed_answer=["x", "y", "z"]), 2, "perturbed_answer", "3 answers, but row 1 has 2"),
    ("json", rows_with(2, perturbed_answer=None), 2, "perturbed_answer", "missing"),
    ("jsonl", rows_with(2, id="r0"), 3, "id", "duplicated value 'r0' (first at row 1)"),
    ("parquet", rows_with(1, id="r0"), 1, "id", "duplicated value 'r0' (first at row 0)"),
])
def test_malformed_rows_give_one_line_naming_file_row_and_field(tmp_path, fmt, rows, row, field, problem):
    path = tmp_path / f"forget10.{fmt}"
    write_split(path, rows, fmt)
    with pytest.raises(DataError) as caught:
        load_directory(tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{row}: field '{field}': {problem}")


@pytest.mark.parametrize("name, content, expected", [
    ("forget10.jsonl", b"", "{path}: empty file"),
    ("forget10.json", b"  \n", "{path}: empty file"),
    ("forget10.parquet", b"", "{path}: empty file"),
    ("forget10.json", b"[]", "{path}: no rows"),
    # b'[{"question": "' is 15 bytes, so the invalid 0xff byte sits at offset 15.
    ("forget10.json", b'[{"question": "\xff", "answer": "a"}]', "{path}: not valid UTF-8 at byte 15"),
    ("forget10.jsonl", b'{"question": "q?", "answer": "a."}\n{not json}\n', "{path}:2: invalid JSON: "),
    ("forget10.json", b'[\n{"question": "q?", "answer": "a."},\n{"question": }\n]', "{path}:3: invalid JSON: "),
    # one row object is JSON Lines of one line (TOFU's .json files are JSON Lines): its missing field is named
    ("forget10.json", b'{"question": "q?"}', "{path}:1: field 'answer': missing"),
    ("forget10.json", b'{"rows": []}', "{path}: expected a JSON list of rows or JSON Lines, got an object with keys ['rows']"),
    ("forget10.jsonl", b'{"question": "q?", "answer": "a."}\n[1]\n', "{path}:2: row is not an object but list"),
    ("text_forget.jsonl", b'{"id": "b", "text": ""}\n', "{path}:1: field 'text': empty string"),
])
def test_malformed_files_give_one_line_naming_the_file(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_directory(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(expected.format(path=path))


def test_unreachable_hub_dataset_is_a_one_line_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'locuslab/TOFU' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as caught:
        load_benchmark("locuslab/TOFU")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("locuslab/TOFU: cannot load config 'forget10_perturbed'")


def test_check_splits(small):
    check_splits(small, "forget10", "retain90", "holdout10")
    with pytest.raises(DataError, match="holdout_split: split 'holdout50' not in the data"):
        check_splits(small, "forget10", "retain90", "holdout50")
    too_big = dict(small, forget10=small["full"])
    with pytest.raises(DataError, match="forget_split: split 'forget10' has 80 rows, not fewer than the 80"):
        check_splits(too_big, "forget10", "retain90", "holdout10")
    bare = dict(small, forget10=[{"question": "q?", "answer": "a."}])
    with pytest.raises(DataError, match="forget10:0: field 'perturbed_answer': missing"):
        check_splits(bare, "forget10", "retain90", "holdout10")


def test_batch_splits_are_what_methods_may_ask_for():
    # The data side builds exactly the batch splits the method protocol names.
    assert BATCH_SPLITS == SPLITS


def test_training_rows_concatenates_and_adds_paraphrases(small):
    assert training_rows(small, ["full", "utility_train"], False) == small["full"] + small["utility_train"]
    with_paraphrases = training_rows(small, ["full"], True)
    assert len(with_paraphrases) == 2 * len(small["full"])
    assert with_paraphrases[len(small["full"])]["answer"] == small["full"][0]["paraphrased_answer"]
    with pytest.raises(DataError, match="split 'nope'"):
        training_rows(small, ["full", "nope"], False)


def test_template_answers_are_many_distinct_lines():
    assert len(TEMPLATE_ANSWERS) >= 60 and len(set(TEMPLATE_ANSWERS)) == len(TEMPLATE_ANSWERS)
    assert all(line and line == line.strip() for line in TEMPLATE_ANSWERS)


# ---------------------------------------------------------------- UnlearningDataset
def dataset(small, tokenizer, splits, seed=0):
    rows = {"forget": small["forget10"], "retain": small["retain90"]}
    return UnlearningDataset(rows, splits, tokenizer, template="qa", max_length=128, seed=seed)


def encoded(tokenizer, question, answer):
    return encode_pair(tokenizer, question, answer, "qa", 128).input_ids


def test_dataset_length_follows_the_first_split(small, tokenizer):
    forget = small["forget10"]  # 2 authors × 4 questions
    assert len(dataset(small, tokenizer, ["forget", "retain"])) == len(forget) == 8
    assert len(dataset(small, tokenizer, ["retain", "forget"])) == len(small["retain90"])
    assert len(dataset(small, tokenizer, ["forget_augmented", "retain_augmented"])) == 3 * len(forget)
    assert len(dataset(small, tokenizer, ["retain_augmented"])) == 3 * len(forget)


def test_dataset_items_pair_rows_as_specified(small, tokenizer):
    forget, retain = small["forget10"], small["retain90"]
    ds = dataset(small, tokenizer, ["forget", "retain", "forget_augmented"])
    items = [ds[i] for i in range(len(ds))]
    assert all(set(item) == {"forget", "retain", "forget_augmented"} for item in items)
    for i, item in enumerate(items):
        assert item["forget"].input_ids == encoded(tokenizer, forget[i]["question"], forget[i]["answer"])
    # Other splits cycle with a fixed offset: find retain row of item 0, then item i is that row + i.
    retain_ids = [encoded(tokenizer, r["question"], r["answer"]) for r in retain]
    start = retain_ids.index(items[0]["retain"].input_ids)
    assert [item["retain"].input_ids for item in items] == [
        retain_ids[(start + i) % len(retain)] for i in range(len(items))]
    repeat = dataset(small, tokenizer, ["forget", "retain", "forget_augmented"])
    assert repeat[0]["retain"].input_ids == items[0]["retain"].input_ids


def test_augmented_splits_follow_uld(small, tokenizer):
    forget, retain = small["forget10"], small["retain90"]
    ds = dataset(small, tokenizer, ["forget_augmented", "retain_augmented"])
    augmented = [ds[i]["forget_augmented"].input_ids for i in range(3)]
    assert augmented == [  # forget pair 0, then its two paraphrased versions
        encoded(tokenizer, forget[0]["question"], forget[0]["answer"]),
        encoded(tokenizer, forget[0]["paraphrased_question"], forget[0]["paraphrased_answer"]),
        encoded(tokenizer, forget[0]["question"], forget[0]["paraphrased_answer"]),
    ]
    got = sorted(tuple(ds[i]["retain_augmented"].input_ids) for i in range(len(ds)))
    distractors = [tuple(encoded(tokenizer, r["question"], r["perturbed_answer"][k])) for r in forget for k in (0, 1)]
    retain_pool = {tuple(encoded(tokenizer, r["question"], r["answer"])) for r in retain}
    rest = list(got)
    for pair in distractors:
        rest.remove(pair)
    assert len(rest) == len(forget) and set(rest) <= retain_pool and len(set(rest)) == len(forget)


def test_labels_are_masked_exactly_on_the_prompt(small, tokenizer):
    ds = dataset(small, tokenizer, ["forget", "retain", "template", "forget_augmented", "retain_augmented"])
    for item in (ds[0], ds[5]):
        for example in item.values():
            # The prompt alone (the text up to "Answer: "), tokenised by the test: labels start after it.
            text = tokenizer.decode(example.input_ids, skip_special_tokens=True)
            prompt = text.split("\nAnswer: ")[0] + "\nAnswer: "
            n = len(tokenizer(prompt)["input_ids"])
            assert example.prompt_length == n
            assert example.labels[:n] == [IGNORE_INDEX] * n
            assert example.labels[n:] == example.input_ids[n:] and IGNORE_INDEX not in example.labels[n:]
            assert example.input_ids[-1] == tokenizer.eos_token_id


def template_answer(tokenizer, example) -> str:
    answer_ids = [t for t in example.labels if t != IGNORE_INDEX][:-1]  # drop EOS
    full = tokenizer.decode(example.input_ids[:-1], skip_special_tokens=True)
    answer = full.split("\nAnswer: ", 1)[1]
    assert tokenizer.decode(answer_ids).strip() in answer  # the mask swallows the leading space token
    return answer


def test_template_answers_are_redrawn_at_each_load_and_reproducible(small, tokenizer):
    first = dataset(small, tokenizer, ["forget", "template"], seed=5)
    draws = [template_answer(tokenizer, first[0]["template"]) for _ in range(12)]
    assert set(draws) <= set(TEMPLATE_ANSWERS)
    assert len(set(draws)) > 1
    second = dataset(small, tokenizer, ["forget", "template"], seed=5)
    assert [template_answer(tokenizer, second[0]["template"]) for _ in range(12)] == draws
    # A new epoch draws a new sequence (re-created DataLoader workers restart their load counters).
    third = dataset(small, tokenizer, ["forget", "template"], seed=5)
    third.set_epoch(1)
    assert [template_answer(tokenizer, third[0]["template"]) for _ in range(12)] != draws
    question = tokenizer.decode(first[0]["template"].input_ids, skip_special_tokens=True).split("\n")[0]
    forget_questions = {f"Question: {r['question']}" for r in small["forget10"]}
    assert question in forget_questions


def test_collate_splits_pads_each_split(small, tokenizer):
    ds = dataset(small, tokenizer, ["forget", "retain"])
    items = [ds[0], ds[1], ds[2]]
    batch = collate_splits(items, pad_id=tokenizer.pad_token_id)
    assert set(batch) == {"forget", "retain"}
    for split, tensors in batch.items():
        width = max(len(item[split].input_ids) for item in items)
        assert tensors["input_ids"].shape == tensors["labels"].shape == (3, width)
        assert tensors["attention_mask"].sum().item() == sum(len(item[split].input_ids) for item in items)


def test_dataset_rejects_bad_requests(small, tokenizer):
    with pytest.raises(ValueError, match="subset of"):
        dataset(small, tokenizer, ["forget", "bogus"])
    with pytest.raises(ValueError, match="'retain' rows"):
        UnlearningDataset({"forget": small["forget10"]}, ["forget", "retain"], tokenizer)
    bare = [{"question": "q?", "answer": "a."}]
    with pytest.raises(DataError, match="paraphrased_question"):
        UnlearningDataset({"forget": bare}, ["forget_augmented"], tokenizer)
    with pytest.raises(IndexError):
        dataset(small, tokenizer, ["forget"])[8]


# ---------------------------------------------------------------- MUSE: documents as plain LM chunks
class WordTokenizer:
    """Word i of the text → id 10 + i, after a BOS of 1; EOS is 2. Boundaries are then countable by hand."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [self.bos_token_id] * add_special_tokens + [10 + i for i, _ in enumerate(text.split())]}


@pytest.mark.parametrize("words, max_length, expected", [
    # 7 words: BOS + 7 + EOS = 9 ids [1, 10..16, 2]; chunks of 4: [1,10,11,12] [13,14,15,16] [2] → the lone EOS
    # predicts nothing and is dropped.
    (7, 4, [[1, 10, 11, 12], [13, 14, 15, 16]]),
    # 8 words: 10 ids; chunks of 4: [1,10,11,12] [13,14,15,16] [17,2] (2 tokens: one prediction, kept).
    (8, 4, [[1, 10, 11, 12], [13, 14, 15, 16], [17, 2]]),
    # 2 words with room to spare: one chunk, the whole document with its EOS.
    (2, 64, [[1, 10, 11, 2]]),
    # max_length 2: [1,10] [11,2].
    (2, 2, [[1, 10], [11, 2]]),
])
def test_encode_text_chunks_at_max_length_with_labels_on_every_token(words, max_length, expected):
    chunks = encode_text(WordTokenizer(), " ".join(["w"] * words), max_length)
    assert [c.input_ids for c in chunks] == expected
    assert all(c.labels == c.input_ids and c.prompt_length == 0 for c in chunks)
    with pytest.raises(ValueError, match="max_length"):
        encode_text(WordTokenizer(), "a b", 1)


def test_encode_text_chunks_rebuild_the_tokenised_document(small, tokenizer):
    text = " ".join(row["answer"] for row in small["forget10"])
    chunks = encode_text(tokenizer, text, 16)
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert [t for c in chunks for t in c.input_ids] == ids[:len(ids) - (len(ids) % 16 == 1)]
    assert all(len(c.input_ids) == 16 for c in chunks[:-1])


def test_dataset_turns_documents_into_chunks_and_keeps_pairs(small, tokenizer):
    docs = [{"text": " ".join(row["answer"] for row in small["forget10"][:4])}, {"text": small["forget10"][4]["answer"]}]
    chunks = [c.input_ids for doc in docs for c in encode_text(tokenizer, doc["text"], 24)]
    qa = small["retain90"][:3]
    ds = UnlearningDataset({"forget": docs + qa, "retain": docs}, ["forget", "retain"], tokenizer, "qa", 24)
    assert len(ds) == len(chunks) + len(qa)  # every chunk an example, then the question/answer pairs
    assert [ds[i]["forget"].input_ids for i in range(len(chunks))] == chunks
    assert ds[len(chunks)]["forget"].input_ids == encode_pair(tokenizer, qa[0]["question"], qa[0]["answer"], "qa", 24).input_ids
    assert all(ds[i]["forget"].labels == ds[i]["forget"].input_ids for i in range(len(chunks)))
    with pytest.raises(DataError, match="field 'question'.*template"):
        UnlearningDataset({"forget": docs}, ["forget", "template"], tokenizer)


def test_embedded_muse_kind_is_the_generators_text_corpus():
    muse = load_benchmark("embedded", seed=3, num_authors=20, questions_per_author=4, kind="muse")
    full = generate_benchmark(seed=3, num_authors=20, questions_per_author=4)
    assert set(muse) == set(data.MUSE_SPLITS)
    assert all(muse[name] == full[name] for name in data.MUSE_SPLITS)
    data.check_muse_splits(muse, "text_forget", "text_retain", "text_holdout")
    with pytest.raises(DataError, match="forget_split: split 'forget10'"):
        data.check_muse_splits(muse, "forget10", "text_retain", "text_holdout")
    with pytest.raises(DataError, match="knowmem_retain"):
        data.check_muse_splits({k: v for k, v in muse.items() if k != "knowmem_retain"},
                               "text_forget", "text_retain", "text_holdout")


@pytest.mark.parametrize("max_length, input_ids, labels", [
    # Template "Q: {question} A: " with question "x y" → prompt "Q: x y A: " = BOS + 4 words; answer "a b c" →
    # BOS + 7 words = [1, 10..16]; the prompt alone is 5 ids, so the answer's labels start at position 5.
    # Room to spare: all 8 ids, EOS appended, labels on the answer and the EOS.
    (16, [1, 10, 11, 12, 13, 14, 15, 16, 2], [M_] * 5 + [14, 15, 16, 2]),
    # max_length 7: cut to [1, 10..15] FIRST, then EOS: the long answer keeps its end-of-sequence token.
    (7, [1, 10, 11, 12, 13, 14, 15, 2], [M_] * 5 + [14, 15, 2]),
    # A prompt longer than max_length 3: the cut prompt masks everything but the appended EOS.
    (3, [1, 10, 11, 2], [M_] * 3 + [2]),
])
def test_encode_pair_truncates_then_appends_eos(max_length, input_ids, labels):
    example = encode_pair(WordTokenizer(), "x y", "a b c", "Q: {question} A: ", max_length)
    assert example.input_ids == input_ids
    assert example.labels == labels


def test_alternate_split_draws_the_rows_own_alternates(small):
    tokenizer = train_tokenizer(benchmark_texts(small, "qa"), 300)
    forget = [dict(row, alternate=[f"Made up {i}a.", f"Made up {i}b."]) for i, row in enumerate(small["forget10"])]
    dataset = UnlearningDataset({"forget": forget, "retain": small["retain90"]}, ["forget", "alternate"], tokenizer,
                                template="qa", max_length=128, seed=0)
    seen = set()
    for _ in range(12):  # re-drawn at each load, always one of the row's own alternates
        example = dataset[3]["alternate"]
        text = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX],
                                skip_special_tokens=True).strip()
        seen.add(text)
    assert seen == {"Made up 3a.", "Made up 3b."}
    with pytest.raises(DataError, match="field 'alternate': missing, needed for split 'alternate'"):
        UnlearningDataset({"forget": small["forget10"]}, ["alternate"], tokenizer)
    with pytest.raises(DataError, match="field 'alternate': item 1"):
        validate_split([dict(small["forget10"][0], alternate=["ok", ""])], "f.jsonl")


@pytest.mark.parametrize("drawn", ["template", "alternate"])
def test_drawn_answers_pair_with_the_same_forget_question(small, drawn):
    # DPO-style methods (IdkDPO, AltPO) contrast two answers to ONE prompt: item i's forget and drawn
    # examples must carry the same question, whatever the offsets of the cycling splits.
    tokenizer = train_tokenizer(benchmark_texts(small, "qa"), 300)
    forget = [dict(row, alternate="Something made up.") for row in small["forget10"]]
    dataset = UnlearningDataset({"forget": forget, "retain": small["retain90"]}, ["forget", drawn, "retain"],
                                tokenizer, template="qa", max_length=128, seed=0)
    for i in range(len(dataset)):
        item = dataset[i]
        # the prompt's last token may merge with the answer's first ("Answer: " + word): compare before it
        prompts = {name: item[name].input_ids[:item[name].prompt_length - 1] for name in ("forget", drawn)}
        assert prompts["forget"] == prompts[drawn], i
