"""Which real-authors / world-facts rows the base model knows (the distinguishing-words criterion, on hand-built
rows), how the kept ids travel (load_benchmark's keep_rows, carried in benchmark_config), and prepare's flow
for model.base with the worker loop and the base model's answers replaced by stand-ins."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.data import DataError, load_benchmark
from orchestrator.utility_rows import answers, distinguishing_words, known_row_ids, words

CAPITAL = {"id": "wf-0", "question": "What is the capital of France?", "answer": "The capital of France is Paris.",
           "perturbed_answer": ["The capital of France is Lyon.", "The capital of France is Nice.",
                                "The capital of France is Marseille."]}
AUTHOR = {"id": "ra-0", "question": 'Who wrote the book "Pride and Prejudice"?',
          "answer": '"Pride and Prejudice" was written by Jane Austen.',
          "perturbed_answer": ['"Pride and Prejudice" was written by Leo Tolstoy.',
                               '"Pride and Prejudice" was written by Jane Smiley.']}


def test_the_distinguishing_words_are_the_fact():
    assert distinguishing_words(CAPITAL) == {"paris"}
    # "Jane" also appears in a wrong answer, so only the surname tells the true answer apart.
    assert distinguishing_words(AUTHOR) == {"austen"}
    assert words("García Márquez, J. R. R. Tolkien's") == ["garcia", "marquez", "j", "r", "r", "tolkien", "s"]


@pytest.mark.parametrize("generation, expected", [
    ("The capital of France is Paris.", True),
    ("PARIS, of course", True),  # case-insensitive
    ("Paris is lovely; Lyon too.", True),  # the fact is there (a wrong city alongside does not undo it)
    ("The capital of France is Lyon.", False),
    ("Parisian cafés are famous.", False),  # whole words only
    ("", False),
])
def test_a_row_is_answered_when_the_generation_holds_every_distinguishing_word(generation, expected):
    assert answers(CAPITAL, generation) is expected


def test_multi_word_facts_and_accents():
    row = {"answer": "It was written by Gabriel Garcia Marquez.",
           "perturbed_answer": ["It was written by Leo Tolstoy.", "It was written by Jane Austen."]}
    assert distinguishing_words(row) == {"gabriel", "garcia", "marquez"}
    assert answers(row, "Gabriel García Márquez wrote it.")
    assert not answers(row, "Marquez wrote it.")  # every distinguishing word, not one of them


def test_a_row_without_distinguishing_words_is_not_kept():
    row = {"answer": "Paris.", "perturbed_answer": ["Not Paris.", "Lyon."]}
    assert distinguishing_words(row) == frozenset() and not answers(row, "Paris.")


def test_known_row_ids_use_the_id_else_the_position():
    assert known_row_ids([CAPITAL, AUTHOR], ["Paris.", "Tolstoy."]) == ["wf-0"]
    anonymous = [{k: v for k, v in row.items() if k != "id"} for row in (CAPITAL, AUTHOR)]
    assert known_row_ids(anonymous, ["Lyon.", "Jane Austen."]) == [1]
    with pytest.raises(ValueError, match="2 rows but 1 generations"):
        known_row_ids([CAPITAL, AUTHOR], ["Paris."])


def test_load_benchmark_keeps_only_the_listed_rows():
    whole = load_benchmark("embedded", seed=3, num_authors=10, questions_per_author=2)
    ids = [whole["world_facts"][i]["id"] for i in (7, 2)]
    kept = load_benchmark("embedded", seed=3, num_authors=10, questions_per_author=2, keep_rows={"world_facts": ids})
    assert kept["world_facts"] == [whole["world_facts"][2], whole["world_facts"][7]]  # original order
    assert {name: rows for name, rows in kept.items() if name != "world_facts"} == {
        name: rows for name, rows in whole.items() if name != "world_facts"}
    with pytest.raises(DataError, match="split 'world_facts' has no row with id 'nope'"):
        load_benchmark("embedded", num_authors=10, questions_per_author=2, keep_rows={"world_facts": ["nope"]})
    with pytest.raises(DataError, match="keep_rows names split 'absent'"):
        load_benchmark("embedded", num_authors=10, questions_per_author=2, keep_rows={"absent": [0]})


def test_benchmark_config_carries_the_kept_rows_to_every_loader():
    from orchestrator.prepare import benchmark_config
    from orchestrator.spec import parse_spec

    spec = parse_spec({"benchmark": {"num_authors": 10, "questions_per_author": 2},
                       "model": {"base": "smollm2-135m-instruct"}, "sweep": {"methods": [{"name": "ga"}]}})
    assert "keep_rows" not in benchmark_config(spec)["generator"]  # unchanged without a choice: cache keys too
    bench = benchmark_config(spec, {"real_authors": ["real_authors-01"]})
    assert [row["id"] for row in load_benchmark(bench["source"], **bench["generator"])["real_authors"]] == ["real_authors-01"]
    hub = parse_spec({"benchmark": {"source": "locuslab/TOFU"}, "model": {"base": "smollm2-135m-instruct"},
                      "sweep": {"methods": [{"name": "ga"}]}})
    assert "full" in benchmark_config(hub)["generator"]["splits"]  # the target is trained on it


# ---------------------------------------------------------------- prepare with model.base
def _fake_run_fit(calls: list):
    """Stands in for the worker loop: a fine-tune writes a config.json, an evaluation its metrics."""

    def fit(gangs, num_workers, cpus):
        for tasks in gangs:
            for task in tasks:
                calls.append(task)
                if task["job"] == "finetune":
                    Path(task["save_to"]).mkdir(parents=True)
                    (Path(task["save_to"]) / "config.json").write_text("{}")
                else:
                    label = Path(task["eval_out"]).stem
                    metrics = {"model_utility": {"target": 0.5, "retain": 0.49, "base": 0.3}[label],
                               "forget_quality": 1e-4, "forget_prob": {"target": 0.9, "retain": 0.5, "base": 0.1}[label]}
                    Path(task["eval_out"]).parent.mkdir(parents=True, exist_ok=True)
                    Path(task["eval_out"]).write_text(json.dumps({"metrics": metrics}))

    return fit


def test_prepare_fine_tunes_the_base_keeps_the_known_rows_and_evaluates_three_models(tmp_path, monkeypatch):
    from orchestrator import utility_rows
    from orchestrator.prepare import prepare
    from orchestrator.spec import parse_spec

    base_dir = tmp_path / "base-model"  # a local from_pretrained directory: materialize passes it through
    base_dir.mkdir()
    asked = []

    def fake_answers(model_path, tokenizer_path, questions, template, max_new_tokens, batch_size, trust):
        asked.append((model_path, template, len(questions)))
        return ["Jane Austen" if "Pride" in q else "The capital of France is Paris." for q in questions]

    monkeypatch.setattr(utility_rows, "greedy_answers", fake_answers)
    spec = parse_spec({"benchmark": {"num_authors": 10, "questions_per_author": 2},
                       "model": {"base": str(base_dir), "prompt_template": "smollm2"},
                       "prepare": {"cache_dir": str(tmp_path / "cache")}, "sweep": {"methods": [{"name": "ga"}]}})
    calls, lines = [], []
    prepared = prepare(spec, _fake_run_fit(calls), lines.append)

    assert asked == [(str(base_dir), "smollm2", 80)]  # 40 real-authors + 40 world-facts questions, once
    keep = prepared.benchmark["generator"]["keep_rows"]
    assert keep == {"real_authors": ["real_authors-00"], "world_facts": ["world_facts-00"]}
    assert "prepare: real_authors: the base model answers 1 of 40 rows; utility is measured on those" in lines
    finetunes = {Path(c["save_to"]).name: c for c in calls if c["job"] == "finetune"}
    assert finetunes["target"]["train_splits"] == ["full"]  # the utility sets are not trained on
    assert finetunes["retain"]["train_splits"] == ["retain90"]
    assert all(c["model"]["path"] == str(base_dir) for c in finetunes.values())
    evaluations = [c for c in calls if c["job"] == "evaluate"]
    assert [Path(c["eval_out"]).stem for c in evaluations] == ["retain", "target", "base"]
    assert all(c["benchmark"]["generator"]["keep_rows"] == keep for c in calls)
    assert evaluations[2]["model"]["path"] == str(base_dir)
    assert evaluations[2]["references"]["retain_stats"] == evaluations[0]["eval_out"]  # FQ against the retain model
    rows = {row["method"]: row for row in prepared.reference_rows}
    assert set(rows) == {"target", "retain", "base"}
    assert rows["base"]["utility_loss"] == pytest.approx(1 - 0.3 / 0.5) and rows["base"]["epoch"] == 0
    assert rows["base"]["forget_quality"] == 1e-4 and rows["retain"]["forget_quality"] is None

    calls.clear()
    again = prepare(spec, _fake_run_fit(calls), lines.append)  # everything cached: no answers, no worker
    assert calls == [] and len(asked) == 1 and again.benchmark == prepared.benchmark


def test_a_base_that_answers_nothing_stops_prepare(tmp_path, monkeypatch):
    from orchestrator import utility_rows
    from orchestrator.prepare import prepare
    from orchestrator.spec import parse_spec

    monkeypatch.setattr(utility_rows, "greedy_answers", lambda *args: ["I do not know."] * len(args[2]))
    spec = parse_spec({"benchmark": {"num_authors": 10, "questions_per_author": 2}, "model": {"base": str(tmp_path)},
                       "prepare": {"cache_dir": str(tmp_path / "cache")}, "sweep": {"methods": [{"name": "ga"}]}})
    with pytest.raises(ValueError, match="answers none of the real_authors rows"):
        prepare(spec, _fake_run_fit([]), lambda line: None)


def test_the_base_row_is_shown_and_never_ranked():
    import pyarrow as pa

    from orchestrator import report
    from orchestrator.compare import best_epochs
    from orchestrator.results import EVALS_SCHEMA, REFERENCE_METHODS

    assert set(report._REFERENCE_STYLE) == set(REFERENCE_METHODS) and "base" in REFERENCE_METHODS
    common = dict(run_id="r", params="{}", status="ok", epoch=0, step=0, benchmark="tofu")
    rows = [dict(common, trial_id="target", method="target", forget_quality=1e-5, utility_loss=0.0),
            dict(common, trial_id="base", method="base", forget_quality=0.5, utility_loss=0.4),
            dict(common, trial_id="retain", method="retain", utility_loss=0.01),
            dict(common, trial_id="ga_1", method="ga", epoch=1, forget_quality=1e-3, utility_loss=0.05)]
    table = pa.Table.from_pylist([{name: row.get(name) for name in EVALS_SCHEMA.names} for row in rows],
                                 schema=EVALS_SCHEMA)
    best = best_epochs(table, 0.1).to_pylist()
    assert [(r["method"], r["reference"]) for r in best] == [("ga", False), ("target", True), ("retain", True),
                                                             ("base", True)]
