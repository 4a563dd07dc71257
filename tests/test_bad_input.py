"""Bad input never reaches Ray, and the security defaults hold.

The corpus under tests/fixtures/bad/ (specs/*.yaml; data/<case>/ directories in TOFU's schema, each with a
spec data_<case>.yaml pointing at it) is run through the CLI's entry point (a few cases also as a real
process): exit status 2, one line on stderr naming the field (file:line for data rows), no run directory,
no Ray started.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BAD = ROOT / "tests" / "fixtures" / "bad"
SET_BASE = "specs/set_base.yaml"  # valid but for 64 workers: a --set that slipped through still stops before Ray

# (case id, spec path relative to tests/fixtures/bad, extra CLI arguments, substrings the one line must hold)
CASES = [
    # -- the spec's structure and types
    ("unknown_method", "specs/unknown_method.yaml", [], ["sweep.methods.0", "unknown method 'nope'"]),
    ("unknown_field", "specs/unknown_field.yaml", [], ["field 'trainig'", "unknown field"]),
    ("unknown_nested_field", "specs/unknown_nested_field.yaml", [], ["field 'training.learning_rate'", "unknown field"]),
    ("wrong_type_epochs", "specs/wrong_type_epochs.yaml", [], ["field 'training.epochs'", "integer"]),
    ("wrong_type_methods", "specs/wrong_type_methods.yaml", [], ["field 'sweep.methods'", "list"]),
    ("wrong_type_seed", "specs/wrong_type_seed.yaml", [], ["field 'seed'", "integer"]),
    ("missing_sweep", "specs/missing_sweep.yaml", [], ["field 'sweep'", "unlearn run needs one"]),
    ("unknown_dtype", "specs/unknown_dtype.yaml", [], ["field 'model.dtype'"]),
    ("unknown_prompt_template", "specs/unknown_prompt_template.yaml", [], ["field 'model.prompt_template'", "chatml-ish"]),
    ("zero_stage_4", "specs/zero_stage_4.yaml", [], ["field 'scaling.zero_stage'"]),
    ("offload_without_zero3", "specs/offload_without_zero3.yaml", [], ["scaling.offload", "zero_stage: 3"]),
    ("zero_num_cpus", "specs/zero_num_cpus.yaml", [], ["field 'ray.num_cpus'"]),
    # -- learning rates and other trainer settings, wherever they are given
    ("negative_lr", "specs/negative_lr.yaml", [], ["field 'training.lr'", "greater than 0"]),
    ("zero_lr", "specs/zero_lr.yaml", [], ["field 'training.lr'", "greater than 0"]),
    ("infinite_lr", "specs/infinite_lr.yaml", [], ["field 'training.lr'", "finite"]),
    ("nan_lr", "specs/nan_lr.yaml", [], ["field 'training.lr'", "finite"]),
    ("negative_lr_in_space", "specs/negative_lr_in_space.yaml", [], ["sweep.methods.0", "space.lr", "positive"]),
    ("infinite_lr_in_space", "specs/infinite_lr_in_space.yaml", [], ["sweep.methods.0", "space.lr", "finite"]),
    ("zero_lr_in_params", "specs/zero_lr_in_params.yaml", [], ["sweep.methods.0", "params.lr", "positive"]),
    ("negative_epochs_in_params", "specs/negative_epochs_in_params.yaml", [], ["params.epochs", ">= 1"]),
    ("zero_epochs_in_space", "specs/zero_epochs_in_space.yaml", [], ["space.epochs", ">= 1"]),
    # -- search spaces
    ("empty_space", "specs/empty_space.yaml", [], ["sweep.methods.0", "empty search space"]),
    ("empty_methods", "specs/empty_methods.yaml", [], ["field 'sweep.methods'", "at least 1"]),
    ("unknown_search_kind", "specs/unknown_search_kind.yaml", [], ["space.lr", "unknown distribution 'normal'"]),
    ("loguniform_low_zero", "specs/loguniform_low_zero.yaml", [], ["space.beta.loguniform", "low must be > 0"]),
    ("loguniform_low_negative", "specs/loguniform_low_negative.yaml", [], ["space.lr.loguniform", "low must be > 0"]),
    ("uniform_low_above_high", "specs/uniform_low_above_high.yaml", [], ["space.beta.uniform", "low < high"]),
    ("space_values_not_list", "specs/space_values_not_list.yaml", [], ["space.lr.grid", "non-empty list"]),
    ("unknown_hyperparameter", "specs/unknown_hyperparameter.yaml", [], ["space.beta", "no such hyperparameter"]),
    ("unknown_method_param", "specs/unknown_method_param.yaml", [], ["params.alpha", "no such hyperparameter"]),
    ("grid_with_loguniform", "specs/grid_with_loguniform.yaml", [], ["sweep.methods[0].space.lr", "grid search"]),
    ("unknown_search_algorithm", "specs/unknown_search_algorithm.yaml", [], ["field 'sweep.search'"]),
    ("zero_num_samples", "specs/zero_num_samples.yaml", [], ["field 'sweep.num_samples'"]),
    ("multi_objective_without_optuna", "specs/multi_objective_without_optuna.yaml", [],
     ["sweep.multi_objective", "optuna"]),
    # -- resources and model references (checked before Ray starts)
    ("too_many_workers", "specs/too_many_workers.yaml", [], ["field 'scaling.num_workers'", "never be scheduled"]),
    ("model_path_missing", "specs/model_path_missing.yaml", [], ["field 'model.target'", "does not exist"]),
    ("retain_path_missing", "specs/retain_path_missing.yaml", [], ["field 'model.retain'", "does not exist"]),
    # -- the file itself
    ("spec_file_missing", "specs/no_such_spec.yaml", [], ["no_such_spec.yaml", "no such spec file"]),
    ("empty_spec", "specs/empty.yaml", [], ["empty.yaml", "YAML mapping"]),
    ("not_a_mapping", "specs/not_a_mapping.yaml", [], ["not_a_mapping.yaml", "YAML mapping"]),
    ("invalid_yaml", "specs/invalid_yaml.yaml", [], ["invalid_yaml.yaml:", "invalid YAML"]),
    ("non_utf8_spec", "specs/non_utf8.yaml", [], ["non_utf8.yaml", "not valid UTF-8"]),
    ("python_tag", "specs/python_tag.yaml", [], ["python_tag.yaml:2", "python/object/apply"]),
    ("python_tag_nested", "specs/python_tag_nested.yaml", [], ["python_tag_nested.yaml:3", "python/object/apply"]),
    # -- --set syntax
    ("set_without_equals", SET_BASE, ["--set", "training.epochs"], ["--set 'training.epochs'", "key=value"]),
    ("set_empty_key", SET_BASE, ["--set", "=3"], ["--set '=3'", "key=value"]),
    ("set_invalid_yaml_value", SET_BASE, ["--set", "training.epochs=[1,"], ["--set training.epochs", "not valid YAML"]),
    ("set_through_a_list", SET_BASE, ["--set", "sweep.methods.0.name=x"], ["--set sweep.methods.0.name", "not a mapping"]),
    ("set_through_a_string", SET_BASE, ["--set", "name.first=x"], ["field 'name'"]),
    ("set_negative_lr", SET_BASE, ["--set", "training.lr=-1"], ["field 'training.lr'", "greater than 0"]),
    ("set_python_tag", SET_BASE, ["--set", 'name=!!python/object/apply:os.system ["touch pwned-by-yaml"]'],
     ["--set name", "not valid YAML"]),
    # -- data: rows (file:line), files, splits
    ("data_row_missing_field", "specs/data_row_missing_field.yaml", [], ["forget10.jsonl:2", "field 'answer'", "missing"]),
    ("data_row_wrong_type", "specs/data_row_wrong_type.yaml", [], ["retain90.jsonl:3", "field 'answer'", "got int"]),
    ("data_question_wrong_type", "specs/data_question_wrong_type.yaml", [],
     ["holdout10.jsonl:2", "field 'question'", "got list"]),
    ("data_empty_answer", "specs/data_empty_answer.yaml", [], ["forget10.jsonl:1", "field 'answer'", "empty"]),
    ("data_duplicated_ids", "specs/data_duplicated_ids.yaml", [], ["retain90.jsonl:3", "field 'id'", "duplicated"]),
    ("data_id_wrong_type", "specs/data_id_wrong_type.yaml", [], ["forget10.jsonl:1", "field 'id'"]),
    ("data_perturbed_not_list", "specs/data_perturbed_not_list.yaml", [],
     ["forget10.jsonl:1", "field 'perturbed_answer'", "list"]),
    ("data_perturbed_count_mismatch", "specs/data_perturbed_count_mismatch.yaml", [],
     ["forget10.jsonl:2", "field 'perturbed_answer'"]),
    ("data_row_not_object", "specs/data_row_not_object.yaml", [], ["retain90.jsonl:2", "not an object"]),
    ("data_invalid_json_line", "specs/data_invalid_json_line.yaml", [], ["retain90.jsonl:2", "invalid JSON"]),
    ("data_empty_file", "specs/data_empty_file.yaml", [], ["holdout10.jsonl", "empty file"]),
    ("data_non_utf8", "specs/data_non_utf8.yaml", [], ["forget10.jsonl", "not valid UTF-8"]),
    ("data_json_not_list", "specs/data_json_not_list.yaml", [], ["forget10.json", "JSON list"]),
    ("data_corrupt_parquet", "specs/data_corrupt_parquet.yaml", [], ["retain90.parquet", "not a readable Parquet"]),
    ("data_duplicate_split_files", "specs/data_duplicate_split_files.yaml", [], ["forget10", "also given by"]),
    ("data_no_split_files", "specs/data_no_split_files.yaml", [], ["no_split_files", "no .json, .jsonl or .parquet"]),
    ("data_no_such_directory", "specs/data_no_such_directory.yaml", [], ["does_not_exist", "no such directory"]),
    ("data_missing_split", "specs/data_missing_split.yaml", [], ["field 'benchmark.holdout_split'", "'holdout10' not found"]),
    ("data_forget_larger_than_data", "specs/data_forget_larger_than_data.yaml", [],
     ["forget_split", "3 rows", "2 rows of the whole data"]),
    # Found by the split check after loading, so it names the split and row index rather than the file.
    ("data_forget_without_perturbed", "specs/data_forget_without_perturbed.yaml", [],
     ["forget10:0", "field 'perturbed_answer'", "missing"]),
]


def test_the_corpus_is_large_and_every_fixture_is_used():
    used = {path for _, path, _, _ in CASES}
    on_disk = {f"specs/{p.name}" for p in (BAD / "specs").iterdir()}
    assert len(CASES) >= 30
    assert on_disk - used == set()  # no fixture file without a case
    data_dirs = {p.name for p in (BAD / "data").iterdir()}
    assert {f"specs/data_{name}.yaml" for name in data_dirs} <= used


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A copy of the fixtures: the CLI runs inside it, so relative data paths resolve and anything a
    refused YAML tag might have created would land there, not in the repository."""
    copy = tmp_path_factory.mktemp("bad") / "bad"
    shutil.copytree(BAD, copy)
    return copy


def assert_one_line_error(stderr: str, expected: list[str]) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("unlearn: error: ")
    for part in expected:
        assert part in lines[0]


@pytest.mark.parametrize("case, spec, extra, expected", CASES, ids=[case[0] for case in CASES])
def test_cli_refuses_bad_input_before_ray(case, spec, extra, expected, corpus, tmp_path, monkeypatch, capsys):
    """Every case through the CLI's entry point in this process; starting Ray at all fails the test."""
    from orchestrator import api, cli

    def no_ray(*args, **kwargs):
        raise AssertionError("bad input reached Ray")

    monkeypatch.setattr(api, "init_ray", no_ray)
    monkeypatch.chdir(corpus)
    run_dir = tmp_path / "run"
    status = cli.main(["run", spec, "--run-dir", str(run_dir), *extra])
    captured = capsys.readouterr()
    assert status == 2, captured.out + captured.err
    assert_one_line_error(captured.err, expected)
    assert not run_dir.exists()
    assert not (corpus / "pwned-by-yaml").exists()


# A few cases again as a user meets them: the real CLI in a fresh process, Ray's temp dir watched.
SUBPROCESS_CASES = ["python_tag", "set_python_tag", "too_many_workers", "model_path_missing",
                    "data_row_missing_field", "data_non_utf8"]


@pytest.mark.parametrize("case, spec, extra, expected", [c for c in CASES if c[0] in SUBPROCESS_CASES],
                         ids=SUBPROCESS_CASES)
def test_cli_process_exits_2_and_starts_no_ray(case, spec, extra, expected, corpus, tmp_path):
    run_dir = tmp_path / "run"
    ray_tmp = tmp_path / "raytmp"  # where a Ray session would appear (RAY_TMPDIR), instead of /tmp/ray
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_TMPDIR=str(ray_tmp), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", spec, "--run-dir", str(run_dir), *extra],
                          cwd=corpus, env=env, capture_output=True, text=True, timeout=300)

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert_one_line_error(proc.stderr, expected)
    assert not run_dir.exists()
    assert not (ray_tmp / "ray").exists() and not list(ray_tmp.glob("**/session_*"))
    assert "Ray instance" not in proc.stdout + proc.stderr
    assert not (corpus / "pwned-by-yaml").exists()


# ---------------------------------------------------------------- security defaults
def test_yaml_python_tag_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    import yaml

    from orchestrator.spec import SpecError, apply_overrides, load_spec

    spec = tmp_path / "tagged.yaml"
    shutil.copy(BAD / "specs" / "python_tag.yaml", spec)
    # Control: an unsafe loader really runs the tag's command (here: touch a file in a scratch dir).
    scratch = tmp_path / "unsafe"
    scratch.mkdir()
    monkeypatch.chdir(scratch)
    yaml.unsafe_load(spec.read_text())
    assert (scratch / "pwned-by-yaml").exists()

    victim = tmp_path / "safe"
    victim.mkdir()
    monkeypatch.chdir(victim)
    with pytest.raises(SpecError, match="python/object/apply"):
        load_spec(spec)
    with pytest.raises(SpecError, match="not valid YAML"):
        apply_overrides({}, ['name=!!python/object/apply:os.system ["touch pwned-by-yaml"]'])
    assert list(victim.iterdir()) == []


# What must never be applied to user input: code evaluation, unpickling, unsafe YAML, shell strings.
_FORBIDDEN_NAMES = {"eval", "exec", "__import__"}
_FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve"}
_SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader"}


def unsafe_calls(source: str) -> list[str]:
    """Every eval/exec, pickle-family import or load, unsafe yaml load, os.system and shell=True in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found += [f"import {n}" for n in names if n.split(".")[0] in _FORBIDDEN_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in _FORBIDDEN_NAMES:
            found.append(f"{func.id}()")
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            owner, attr = func.value.id, func.attr
            if owner == "yaml" and attr in ("unsafe_load", "full_load", "unsafe_load_all", "full_load_all"):
                found.append(f"yaml.{attr}()")
            if owner == "yaml" and attr in ("load", "load_all"):
                loader = next((k.value for k in node.keywords if k.arg == "Loader"), None)
                loader_name = getattr(loader, "attr", getattr(loader, "id", None))
                if loader_name not in _SAFE_YAML_LOADERS:
                    found.append(f"yaml.{attr}() without SafeLoader")
            if owner == "os" and attr in ("system", "popen"):
                found.append(f"os.{attr}()")
            if owner == "torch" and attr == "load":
                weights_only = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append("torch.load() without weights_only=True")
        if any(k.arg == "shell" and isinstance(k.value, ast.Constant) and k.value.value for k in node.keywords):
            found.append("shell=True")
    return found


def test_the_scanner_finds_each_unsafe_pattern():
    source = "\n".join([
        "import pickle", "from dill import loads", "eval(text)", "exec(text)", "yaml.load(text)",
        "yaml.load(text, Loader=yaml.Loader)", "yaml.unsafe_load(text)", "os.system(cmd)",
        "subprocess.run(cmd, shell=True)", "torch.load(path)",
        # and these are fine:
        "model.eval()", "yaml.safe_load(text)", "yaml.load(text, Loader=yaml.SafeLoader)",
        "torch.load(path, weights_only=True)", "subprocess.run(['git', 'rev-parse'])",
    ])
    assert unsafe_calls(source) == [
        "import pickle", "import dill", "eval()", "exec()", "yaml.load() without SafeLoader",
        "yaml.load() without SafeLoader", "yaml.unsafe_load()", "os.system()", "shell=True",
        "torch.load() without weights_only=True",
    ]


def test_package_never_evaluates_or_unpickles_input():
    files = sorted((ROOT / "orchestrator").rglob("*.py")) + sorted((ROOT / "methods").rglob("*.py"))
    assert len(files) > 10
    found = {str(f.relative_to(ROOT)): calls for f in files if (calls := unsafe_calls(f.read_text("utf-8")))}
    assert found == {}


def _captured_trust_flags(config: dict, monkeypatch) -> list[bool]:
    """Run the worker loop until it loads its tokenizer; return the trust_remote_code it passed."""
    import torch

    from orchestrator import models
    from orchestrator.worker import WorkerContext, run_job

    seen = []

    class Loaded(Exception):
        pass

    def fake_load_tokenizer(reference, trust_remote_code=False):
        seen.append(trust_remote_code)
        raise Loaded

    monkeypatch.setattr(models, "load_tokenizer", fake_load_tokenizer)
    ctx = WorkerContext(0, 1, torch.device("cpu"), report=lambda metrics, checkpoint: None)
    with pytest.raises(Loaded):
        run_job(config, ctx)
    return seen


@pytest.mark.parametrize("asked", [None, True])
def test_trust_remote_code_is_off_unless_the_spec_asks(asked, monkeypatch, tmp_path):
    from orchestrator import api
    from orchestrator.prepare import Prepared, finetune_config
    from orchestrator.spec import parse_spec
    from tests.conftest import tiny_spec

    model = {"target": "embedded"} if asked is None else {"target": "embedded", "trust_remote_code": asked}
    spec = parse_spec(tiny_spec(tmp_path, model=model))
    expected = bool(asked)
    assert spec.model.trust_remote_code is expected
    monkeypatch.setattr(api, "provenance", lambda: {"git_sha": "x", "versions": "{}"})
    prepared = Prepared("/models/target", "/models/tok", None, None, [], 0.0)
    base = api.base_trial_config(spec, tmp_path, "run-1", prepared)
    trial = dict(base, job="unlearn", method="ga", params={}, trial_id="ga_1", trial_params={})
    finetune = finetune_config(spec, "/models/init", "/models/tok", ["full"], str(tmp_path / "out"))
    assert base["model"]["trust_remote_code"] is expected
    assert finetune["model"]["trust_remote_code"] is expected
    # What the worker hands to the loaders is that value (both for trials and for prepare's fine-tunes).
    assert _captured_trust_flags(trial, monkeypatch) == [expected]
    assert _captured_trust_flags(finetune, monkeypatch) == [expected]


def test_loaders_pass_trust_remote_code_through_and_default_to_false(monkeypatch):
    import transformers

    from orchestrator import models

    calls = []

    def fake_from_pretrained(reference, **kwargs):
        calls.append(kwargs.get("trust_remote_code"))
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_from_pretrained)
    for load in (models.load_model, models.load_tokenizer):
        with pytest.raises(models.ModelLoadError):
            load("some/model")
    with pytest.raises(models.ModelLoadError):
        models.load_model("some/model", "float32", True)
    assert calls == [False, False, True]


@pytest.mark.parametrize("host", [None, "0.0.0.0"])
def test_local_dashboard_binds_to_loopback_unless_asked(host, monkeypatch, tmp_path):
    import ray

    from orchestrator import api
    from orchestrator.spec import parse_spec
    from tests.conftest import tiny_spec

    spec = parse_spec(tiny_spec(tmp_path, **({} if host is None else {"ray": {"dashboard_host": host}})))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name in api.RAY_ENV_DEFAULTS:  # init_ray sets these; restore them after the test
        monkeypatch.delenv(name, raising=False)
    captured = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: captured.append(kwargs))
    api.init_ray(spec, None)
    assert len(captured) == 1
    assert captured[0]["dashboard_host"] == (host or "127.0.0.1")
    assert "address" not in captured[0]  # a local cluster, not a connection
