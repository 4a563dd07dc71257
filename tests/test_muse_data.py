"""load_muse: MUSE corpora from local files (both layouts) and the hub mapping, without network."""
from __future__ import annotations

import json

import pytest

from orchestrator.data import (
    MUSE_SPLITS,
    DataError,
    load_benchmark,
    load_muse,
)

FORGET_DOCS = ["The mayor opened the bridge.\nIt cost nine million pounds.", "A storm closed the port."]
RETAIN_DOCS = ["The library extended its hours.", "A new bakery opened on Main Street."]
HOLDOUT_DOCS = ["The council met on Tuesday."]
FORGET_QA = [{"question": "Who opened the bridge?", "answer": "The mayor"}]
RETAIN_QA = [{"question": "What opened on Main Street?", "answer": "A new bakery"}]
VERBMEM = [{"prompt": "The mayor opened", "gt": "the bridge."}]
FORGET_ICL = [{"question": "What did the storm close?", "answer": "The port"}]
RETAIN_ICL = [{"question": "What extended its hours?", "answer": "The library"}]


def write_json(path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def flat_corpus(root):
    """Our own split names, one file format per split; the .txt separates documents by a blank line."""
    (root / "text_forget.txt").write_text("\n\n".join(FORGET_DOCS) + "\n", encoding="utf-8")
    write_jsonl(root / "text_retain.jsonl", [{"text": t} for t in RETAIN_DOCS])
    write_json(root / "text_holdout.json", HOLDOUT_DOCS)  # plain strings, as MUSE ships raw/*.json
    write_json(root / "knowmem_forget.json", FORGET_QA)
    write_jsonl(root / "knowmem_retain.jsonl", RETAIN_QA)
    return root


def muse_repo_corpus(root):
    """The layout of data/<corpus>/ in the MUSE repository (knowmem's retain set under its old name)."""
    write_json(root / "raw" / "forget.json", FORGET_DOCS)
    # The run-together .txt beside it must lose to the .json, which keeps article boundaries.
    (root / "raw" / "forget.txt").write_text("".join(FORGET_DOCS), encoding="utf-8")
    write_json(root / "raw" / "retain1.json", RETAIN_DOCS)
    write_json(root / "raw" / "retain2.json", ["Not the training retain set."])
    write_json(root / "raw" / "holdout.json", HOLDOUT_DOCS)
    write_json(root / "knowmem" / "forget_qa.json", FORGET_QA)
    write_json(root / "knowmem" / "retain2_qa.json", RETAIN_QA)
    write_json(root / "verbmem" / "forget.json", VERBMEM)
    write_json(root / "knowmem" / "forget_qa_icl.json", FORGET_ICL)
    write_json(root / "knowmem" / "retain2_qa_icl.json", RETAIN_ICL)
    return root


def texts(rows):
    return [row["text"] for row in rows]


# ---------------------------------------------------------------- local layouts
def test_flat_directory_gives_every_split_in_the_evaluation_schema(tmp_path):
    corpus = load_muse(str(flat_corpus(tmp_path)))
    assert list(corpus) == list(MUSE_SPLITS)  # no verbmem or example files: the optional splits are simply absent
    assert texts(corpus["text_forget"]) == FORGET_DOCS  # the inner newline stays, the blank line splits
    assert texts(corpus["text_retain"]) == RETAIN_DOCS
    assert corpus["text_holdout"] == [{"text": HOLDOUT_DOCS[0]}]
    assert corpus["knowmem_forget"] == FORGET_QA
    assert corpus["knowmem_retain"] == RETAIN_QA


def test_muse_repository_layout_maps_raw_knowmem_and_verbmem(tmp_path):
    corpus = load_muse(str(muse_repo_corpus(tmp_path)))
    assert texts(corpus["text_forget"]) == FORGET_DOCS  # from forget.json, not the run-together .txt
    assert texts(corpus["text_retain"]) == RETAIN_DOCS  # retain1, the set methods train on
    assert texts(corpus["text_holdout"]) == HOLDOUT_DOCS
    assert corpus["knowmem_retain"] == RETAIN_QA  # found under its old name retain2_qa
    assert corpus["verbmem_forget"] == VERBMEM
    assert corpus["knowmem_forget_icl"] == FORGET_ICL and corpus["knowmem_retain_icl"] == RETAIN_ICL


def test_txt_documents_split_on_blank_lines_only(tmp_path):
    flat_corpus(tmp_path)
    (tmp_path / "text_forget.txt").write_text("one\ntwo\n\n\n\nthree  \n   \nfour", encoding="utf-8")
    corpus = load_muse(str(tmp_path), splits=["text_forget"])
    # Written out by hand: runs of blank (or whitespace-only) lines separate; trailing spaces go.
    assert texts(corpus["text_forget"]) == ["one\ntwo", "three", "four"]


def test_splits_argument_restricts_and_requires(tmp_path):
    muse_repo_corpus(tmp_path)
    assert list(load_muse(str(tmp_path), splits=["knowmem_forget", "verbmem_forget"])) == [
        "knowmem_forget", "verbmem_forget"]
    (tmp_path / "verbmem" / "forget.json").unlink()
    with pytest.raises(DataError, match=r"split 'verbmem_forget' not found \(looked for verbmem_forget\{"):
        load_muse(str(tmp_path), splits=["verbmem_forget"])


def test_load_benchmark_with_kind_muse_is_load_muse(tmp_path):
    flat_corpus(tmp_path)
    assert load_benchmark(str(tmp_path), kind="muse") == load_muse(str(tmp_path))
    with pytest.raises(ValueError, match="benchmark kind 'wmdp'"):
        load_benchmark(str(tmp_path), kind="wmdp")


# ---------------------------------------------------------------- bad input
def test_missing_required_split_names_it_and_the_files_tried(tmp_path):
    flat_corpus(tmp_path)
    (tmp_path / "text_holdout.json").unlink()
    with pytest.raises(DataError, match=r"split 'text_holdout' not found \(looked for text_holdout\{.*raw/holdout"):
        load_muse(str(tmp_path))


def test_unknown_split_and_bad_sources(tmp_path):
    with pytest.raises(DataError, match="no MUSE split 'forget10'"):
        load_muse(str(tmp_path), splits=["forget10"])
    with pytest.raises(DataError, match="no such directory"):
        load_muse(str(tmp_path / "absent"))
    write_json(tmp_path / "file.json", [])
    with pytest.raises(DataError, match="is a file"):
        load_muse(str(tmp_path / "file.json"))


def test_text_row_without_text_names_file_and_line(tmp_path):
    flat_corpus(tmp_path)
    write_jsonl(tmp_path / "text_retain.jsonl", [{"text": "fine"}, {"body": "no text field"}])
    with pytest.raises(DataError, match=r"text_retain\.jsonl:2: field 'text': missing"):
        load_muse(str(tmp_path))


def test_knowmem_row_without_answer_is_refused(tmp_path):
    flat_corpus(tmp_path)
    write_json(tmp_path / "knowmem_forget.json", [{"question": "Who?", "answer": "Me"}, {"question": "Where?"}])
    with pytest.raises(DataError, match=r"knowmem_forget\.json:1: field 'answer': missing"):
        load_muse(str(tmp_path))


def test_verbmem_row_needs_prompt_and_continuation(tmp_path):
    muse_repo_corpus(tmp_path)
    write_json(tmp_path / "verbmem" / "forget.json", [{"prompt": "The mayor", "gt": ""}])
    with pytest.raises(DataError, match=r"forget\.json:0: field 'gt': empty string"):
        load_muse(str(tmp_path))


# ---------------------------------------------------------------- hub mapping (no network: a fake client)
class FakeSplit:
    def __init__(self, rows):
        self.rows = rows

    def to_list(self):
        return self.rows


def test_hub_reads_muse_configs_and_splits(monkeypatch):
    import datasets

    served = {("raw", "forget"): [{"text": "f"}], ("raw", "retain1"): [{"text": "r"}],
              ("raw", "holdout"): [{"text": "h"}], ("knowmem", "forget_qa"): FORGET_QA,
              ("knowmem", "retain_qa"): RETAIN_QA, ("verbmem", "forget"): VERBMEM,
              ("knowmem", "forget_qa_icl"): FORGET_ICL, ("knowmem", "retain_qa_icl"): RETAIN_ICL}
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return FakeSplit(served[(config, split)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = load_muse("muse-bench/MUSE-News")
    assert sorted(calls) == sorted(("muse-bench/MUSE-News", *key) for key in served)
    assert corpus["text_retain"] == [{"text": "r"}] and corpus["knowmem_retain"] == RETAIN_QA
    assert corpus["verbmem_forget"] == VERBMEM and corpus["knowmem_forget_icl"] == FORGET_ICL


def test_unreachable_hub_is_a_one_line_error(monkeypatch):
    import datasets

    def offline(name, config, split):
        raise ConnectionError("offline\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        load_muse("muse-bench/MUSE-News", splits=["knowmem_forget"])
    assert str(err.value) == ("muse-bench/MUSE-News: cannot load config 'knowmem' split 'forget_qa' (split "
                              "'knowmem_forget') from the Hugging Face hub: ConnectionError: offline")
