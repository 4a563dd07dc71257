"""`unlearn eval` on a local TOFU snapshot in its published layout, and the gaps that used to be silent."""
from __future__ import annotations

import json
import os
import time

import pytest

from orchestrator import cli
from orchestrator.data import generate_benchmark, load_benchmark
from orchestrator.errors import DataError
from orchestrator.spec import parse_spec
from tests.conftest import tiny_spec

# TOFU's configs as the hub names them (its local snapshots use the same file names), and which of our splits
# each one is: forget10 is read from forget10_perturbed.json, which carries the paraphrased and wrong answers.
PUBLISHED = {"forget10_perturbed": "forget10", "retain90": "retain90", "holdout10": "holdout10",
             "retain_perturbed": "retain90", "real_authors_perturbed": "real_authors",
             "world_facts_perturbed": "world_facts", "full": "full"}
TOFU_METRICS = ("forget_quality", "model_utility", "forget_truth_ratio", "forget_prob", "forget_rouge", "retain_prob",
                "retain_rouge", "retain_truth_ratio", "ra_prob", "ra_rouge", "ra_truth_ratio", "wf_prob", "wf_rouge",
                "wf_truth_ratio", "extraction_strength", "exact_memorization", "mia_loss_auc", "mia_zlib_auc",
                "mia_mink_auc", "mia_minkpp_auc", "privleak")


def write_published_tofu(directory, bench) -> None:
    """One JSON Lines file per config, in .json files, as TOFU ships them; forget10.json holds only the
    question/answer pairs (like the hub's forget10 config), beside forget10_perturbed.json."""
    directory.mkdir(parents=True)
    for stem, split in PUBLISHED.items():
        rows = bench[split][:40] if stem == "retain_perturbed" else bench[split]
        (directory / f"{stem}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "forget10.json").write_text(
        "".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in bench["forget10"]))


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tofu") / "TOFU"
    write_published_tofu(directory, generate_benchmark(seed=0, num_authors=20, questions_per_author=3))
    return directory


def test_a_published_snapshot_loads_under_our_split_names(snapshot):
    splits = ["forget10", "retain90", "holdout10", "retain_perturbed", "real_authors", "world_facts", "full"]
    data = load_benchmark(str(snapshot), splits=splits)
    assert set(data) == set(splits)
    assert "perturbed_answer" in data["forget10"][0]  # forget10 came from forget10_perturbed.json
    assert "perturbed_answer" in data["real_authors"][0] and len(data["full"]) == 60


def test_the_renamed_layout_still_loads(tmp_path):
    bench = generate_benchmark(seed=0, num_authors=20, questions_per_author=3)
    for split in ("forget10", "retain90", "holdout10", "real_authors", "world_facts"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bench[split]))
    data = load_benchmark(str(tmp_path), splits=["forget10", "retain90", "holdout10", "retain_perturbed",
                                                  "real_authors", "world_facts"])
    assert "retain_perturbed" not in data  # optional locally: the retain metrics score retain90's rows
    assert data["forget10"] == bench["forget10"]


def _validate(snapshot, *overrides) -> int:
    return cli.main(["validate", str(snapshot.parent / "spec.yaml"), *overrides])


def _spec_file(snapshot, tmp_path) -> None:
    (snapshot.parent / "spec.yaml").write_text(json.dumps({
        "benchmark": {"source": str(snapshot)}, "model": {"target": str(tmp_path)}}))


def test_a_missing_utility_split_is_an_error_naming_it(snapshot, tmp_path, capsys):
    _spec_file(snapshot, tmp_path)
    assert _validate(snapshot) == 0
    (snapshot / "world_facts_perturbed.json").rename(tmp_path / "moved.json")
    try:
        assert _validate(snapshot) == 2
        error = capsys.readouterr().err
        assert "field 'evaluation.utility_sets'" in error and "'world_facts' not found" in error
        assert _validate(snapshot, "--set", "evaluation.utility_sets=false") == 0  # turned off on purpose: valid
    finally:
        (tmp_path / "moved.json").rename(snapshot / "world_facts_perturbed.json")


def test_real_authors_without_wrong_answers_is_refused_before_ray(snapshot, tmp_path):
    from orchestrator.data import check_splits

    data = load_benchmark(str(snapshot), splits=["forget10", "retain90", "holdout10", "real_authors", "world_facts"])
    data["real_authors"] = [{k: v for k, v in r.items() if k != "perturbed_answer"} for r in data["real_authors"]]
    with pytest.raises(DataError, match="real_authors:0: field 'perturbed_answer': missing"):
        check_splits(data, "forget10", "retain90", "holdout10")


def test_a_method_without_a_space_names_the_fix_for_a_grid(tmp_path):
    from orchestrator.api import preflight

    spec = parse_spec(tiny_spec(tmp_path, sweep={"methods": [{"name": "ga"}]}))
    with pytest.raises(ValueError, match=r"space.lr': grid search needs grid or choice values, got loguniform "
                                         r"\(method 'ga'.s default space\); give space: \{lr: \{grid"):
        preflight(spec)


def test_evaluation_length_is_its_own_setting(tmp_path):
    from orchestrator.api import base_trial_config
    from orchestrator.prepare import Prepared
    from orchestrator.evaluation.config import eval_config

    spec = parse_spec(tiny_spec(tmp_path))  # training.max_length 64
    prepared = Prepared("m", "t", None, None, [], 0.0)
    config = dict(base_trial_config(spec, tmp_path, "r", prepared), trial_id="x")
    assert spec.training.max_length == 64 and eval_config(config).max_length == 512


def test_the_evaluation_cache_notices_a_changed_model(tmp_path):
    from orchestrator.prepare import evaluation_dir

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    spec = parse_spec(tiny_spec(tmp_path / "cache"))
    before = evaluation_dir(spec, "data", str(model), None)
    assert evaluation_dir(spec, "data", str(model), None) == before  # same files, same cache entry
    time.sleep(0.01)
    (model / "model.safetensors").write_bytes(b"weights, fine-tuned again")
    os.utime(model / "model.safetensors")
    assert evaluation_dir(spec, "data", str(model), None) != before


@pytest.mark.integration
def test_unlearn_eval_scores_every_tofu_metric_on_a_published_snapshot(snapshot, tmp_path):
    """Two models and a retain model on the snapshot, no sweep, no Ray: every TOFU metric comes out."""
    from orchestrator.models import build_embedded_model
    from orchestrator.results import read_evals, read_samples
    from orchestrator.tokenizer import benchmark_texts, train_tokenizer

    bench = load_benchmark(str(snapshot), splits=["full", "real_authors", "world_facts"])
    tokenizer = train_tokenizer(benchmark_texts(bench, "qa"), 400)
    paths = {}
    for name, seed in (("target", 0), ("retain", 1), ("other", 2)):
        paths[name] = tmp_path / name
        model = build_embedded_model(len(tokenizer), 32, 2, 2, 64, 256, seed=seed)
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    out = tmp_path / "scores"
    code = cli.main(["eval", str(paths["target"]), "--model", f"other={paths['other']}", "--out", str(out),
                     "--set", f"benchmark.source={snapshot}", "--set", f"model.retain={paths['retain']}",
                     "--set", "evaluation.max_new_tokens=8", "--set", f"prepare.cache_dir={tmp_path / 'cache'}"])
    assert code == 0
    rows = {r["trial_id"]: r for r in read_evals(out).to_pylist()}
    assert set(rows) == {"target", "retain", "other"}
    for name in ("target", "other"):
        missing = [m for m in TOFU_METRICS if rows[name][m] is None]
        assert missing == [], (name, missing, rows[name]["not_measured"])
    assert rows["other"]["method"] == "model"
    target_mu, other_mu = rows["target"]["model_utility"], rows["other"]["model_utility"]
    if target_mu:  # utility loss is against the target's utility (random models here may score 0)
        assert rows["other"]["utility_loss"] == pytest.approx(1 - other_mu / target_mu)
    else:
        assert rows["other"]["utility_loss"] is None and "utility_loss" in json.loads(rows["other"]["not_measured"])
    assert rows["retain"]["forget_quality"] is None and "reference" in json.loads(rows["retain"]["not_measured"])["forget_quality"]
    samples = read_samples(out).to_pylist()
    assert {s["trial_id"] for s in samples} == {"target", "retain", "other"}
    assert (out / "ranking.parquet").exists()


def test_a_model_may_not_take_a_reference_rows_name(tmp_path):
    from orchestrator.eval_job import named_models
    from orchestrator.spec import SpecError

    assert named_models([str(tmp_path / "ckpt"), "mine=org/model"]) == {"ckpt": str(tmp_path / "ckpt"),
                                                                         "mine": "org/model"}
    for taken in ("target", "retain", "base"):  # the reference rows (results.REFERENCE_METHODS) use these
        with pytest.raises(SpecError, match=f"the name '{taken}' is taken"):
            named_models([f"{taken}=org/model"])
    with pytest.raises(SpecError, match="is taken"):
        named_models(["a=org/x", "a=org/y"])
