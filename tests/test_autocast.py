"""training.autocast: the training forwards run in bf16 under torch.autocast, the methods receive float32
logits, and the weights the optimizer updates stay float32."""
from __future__ import annotations

import pytest
import torch

from orchestrator.models import build_embedded_model
from orchestrator.steps import forward


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_autocast_forward_computes_in_bf16_and_hands_over_float32():
    model = build_embedded_model(64, 32, 2, 2, 64, 32, seed=0)
    batch = _batch()
    full = forward(model, batch, hidden_layer=1)
    cast = forward(model, batch, hidden_layer=1, autocast=torch.bfloat16)
    assert cast.logits.dtype == torch.float32 and cast.hidden.dtype == torch.float32
    assert not torch.equal(cast.logits, full.logits)  # the matmuls really ran in bf16 ...
    # ... to bf16's precision (8 mantissa bits: relative error ~2^-8 per product, a few times that summed).
    assert torch.allclose(cast.logits, full.logits, atol=0.05, rtol=0.05)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_an_update_under_autocast_keeps_float32_weights_and_lowers_the_loss():
    from methods.base import nll

    model = build_embedded_model(64, 32, 2, 2, 64, 32, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = _batch()
    losses = []
    for _ in range(3):
        loss = nll(forward(model, batch, None, autocast=torch.bfloat16))
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("value, ok", [("bfloat16", True), (None, True), ("float16", False)])
def test_the_spec_accepts_bfloat16_or_nothing(value, ok):
    from orchestrator.spec import SpecError, parse_spec

    data = {"training": {"autocast": value}, "sweep": {"methods": [{"name": "ga"}]}}
    if ok:
        assert parse_spec(data).training.autocast == value
    else:
        with pytest.raises(SpecError, match="field 'training.autocast'"):
            parse_spec(data)


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, None)])
def test_autocast_runs_only_where_the_device_multiplies_bf16_natively(monkeypatch, capsys, native, expected):
    # Without AVX-512 BF16 / AMX torch's bf16 GEMM is a reference kernel, ~18x slower than float32: the
    # request falls back to the model's dtype and says so.
    from orchestrator import models

    monkeypatch.setattr(models, "native_bf16", lambda device: native)
    assert models.training_autocast("bfloat16", torch.device("cpu")) is expected
    assert models.training_autocast(None, torch.device("cpu")) is None
    said = capsys.readouterr().out
    assert ("training.autocast: bfloat16 ignored" in said) is (not native)
