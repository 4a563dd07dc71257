"""End to end inside a real local Ray: ZeRO-3 gangs for the methods with a reference model or an assistant,
LoRA with gradient checkpointing. (2-worker ZeRO-2 GA/GradDiff trials: tests/test_sweep.py's grid run.)"""
from __future__ import annotations

import pytest

from orchestrator.spec import parse_spec
from tests.conftest import tiny_spec

pytestmark = pytest.mark.integration


def test_reference_methods_uld_and_mollm_under_zero3(ray_local, tiny_cache, tmp_path):
    """NPO and RMU need the frozen reference, partitioned by ZeRO-3 like the trained model; ULD trains an
    assistant and is evaluated as target − α·assistant; MOLLM takes the multi-objective update."""
    from orchestrator.api import run

    spec = parse_spec(tiny_spec(
        tiny_cache,
        training={"epochs": 1, "batch_size": 4, "max_length": 64, "warmup_epochs": 0},
        scaling={"num_workers": 2, "cpus_per_worker": 0.99, "zero_stage": 3},
        sweep={"methods": [
            {"name": "npo", "space": {"lr": {"grid": [1e-4]}}, "params": {"epochs": 1}},
            {"name": "rmu", "params": {"layer": 0, "epochs": 1}, "space": {"lr": {"grid": [1e-4]}}},
            {"name": "uld", "params": {"assistant_layers": 1, "lora_rank": 4, "lora_alpha": 4, "epochs": 1},
             "space": {"lr": {"grid": [1e-3]}}},
            {"name": "mollm", "params": {"epochs": 1}, "space": {"lr": {"grid": [1e-4]}}},
        ]},
    ))
    result = run(spec, run_dir=tmp_path / "run", log=lambda line: None)
    final = {r["method"]: r for r in result.evals.to_pylist() if r["status"] == "ok" and r["epoch"] == 1}
    assert set(final) >= {"npo", "rmu", "uld", "mollm"}
    for method in ("npo", "rmu", "uld", "mollm"):
        row = final[method]
        assert row["zero_stage"] == 3 and row["num_workers"] == 2
        assert row["forget_quality"] is not None and row["model_utility"] is not None
    # MOLLM reports the mean common-descent weights of the epoch; they lie on the simplex.
    weights = [value for key, value in final["mollm"].items() if key.startswith("extra.lambda.") and value is not None]
    assert weights and sum(weights) == pytest.approx(1.0, abs=1e-6)


def test_lora_and_gradient_checkpointing(ray_local, tiny_cache, tmp_path):
    from orchestrator.api import run

    spec = parse_spec(tiny_spec(
        tiny_cache,
        training={"epochs": 1, "batch_size": 4, "max_length": 64, "warmup_epochs": 0, "lr": 1e-3,
                  "gradient_checkpointing": True, "lora": {"rank": 4, "alpha": 8}},
        scaling={"num_workers": 1, "cpus_per_worker": 0.99, "zero_stage": 2},
        sweep={"methods": [{"name": "npo", "space": {"lr": {"grid": [1e-3]}}}]},
    ))
    result = run(spec, run_dir=tmp_path / "run", log=lambda line: None)
    npo = [r for r in result.evals.to_pylist() if r["method"] == "npo"]
    assert npo and npo[-1]["status"] == "ok" and npo[-1]["forget_prob"] is not None
