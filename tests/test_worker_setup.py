"""What the worker builds before its first step: which frozen models a method gets, and at what cost."""
from __future__ import annotations

import pytest
import torch

from methods import build_method
from orchestrator.models import build_embedded_model
from orchestrator.worker import AdaptersOff, WorkerContext, build_trained_module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    build_embedded_model(64, 16, 2, 2, 32, 64, seed=0).save_pretrained(path)
    return path


def config_for(model_dir, lora=None) -> dict:
    return {"model": {"path": str(model_dir), "dtype": "float32", "trust_remote_code": False},
            "training": {"lora": lora, "gradient_checkpointing": False}, "scaling": {"zero_stage": 2}}


CTX = WorkerContext(0, 1, torch.device("cpu"), report=lambda metrics, checkpoint: None)


def test_mollm_without_its_kl_term_builds_no_reference(model_dir):
    _, reference, _ = build_trained_module(config_for(model_dir), CTX, build_method("mollm", kl=False))
    assert reference is None
    _, reference, _ = build_trained_module(config_for(model_dir), CTX, build_method("mollm"))
    assert isinstance(reference, torch.nn.Module)


def test_under_lora_the_reference_is_the_base_with_adapters_off(model_dir):
    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": None}
    module, reference, _ = build_trained_module(config_for(model_dir, lora), CTX, build_method("npo"))
    assert isinstance(reference, AdaptersOff) and reference.model is module  # no second copy of the weights
    # Move the adapters away from their zero start: the policy changes, the reference must not.
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.5)
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    base = build_embedded_model(64, 16, 2, 2, 32, 64, seed=0).eval()
    module.eval()
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        policy = module(input_ids=ids).logits
        got = reference(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert not torch.allclose(policy, expected, atol=1e-4)  # the adapters do act on the policy
    assert torch.allclose(got, expected, atol=1e-6)
    with torch.no_grad():  # and they are on again afterwards
        assert torch.allclose(module(input_ids=ids).logits, policy)
