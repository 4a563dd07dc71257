"""MOLLM's objectives: unlearning cross-entropy's bounded gradient, each objective against a float64
transcription of its formula, and the hyperparameter checks.

Expected values are not computed with methods.base helpers: ``token_logprobs64`` recomputes every
answer-token log-probability with Python floats (math.exp / math.log over the logits rows).
"""
from __future__ import annotations

import math

import pytest
import torch

from methods import MethodInputs, ModelOutput, build_method, get_method_class, method_names
from methods.base import nll
from methods.mollm import unlearning_cross_entropy
from orchestrator.encoding import IGNORE_INDEX

M = IGNORE_INDEX
TRAINER_KEYS = {"lr", "epochs", "weight_decay"}


# ---------------------------------------------------------------- float64 transcriptions
def log_softmax64(row: list[float]) -> list[float]:
    top = max(row)
    log_total = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - log_total for x in row]


def token_logprobs64(out: ModelOutput) -> list[float]:
    """Every answer token's log-prob over the batch: position t's logits score label t+1."""
    logits, labels = out.logits.double().tolist(), out.labels.tolist()
    return [log_softmax64(logits[b][t])[labels[b][t + 1]]
            for b in range(len(labels)) for t in range(len(labels[b]) - 1) if labels[b][t + 1] != M]


def uce64(out: ModelOutput, d: float) -> float:
    logprobs = token_logprobs64(out)
    return -sum(math.log1p(-math.exp(lp) / d) for lp in logprobs) / len(logprobs)


def nll64(out: ModelOutput) -> float:
    logprobs = token_logprobs64(out)
    return -sum(logprobs) / len(logprobs)


def kl64(policy: ModelOutput, reference: ModelOutput, padding_too: bool = True) -> float:
    """Σ_v p_ref(v)·(log p_ref(v) − log p_θ(v)) per position, averaged over every batch·seq position (the
    reference's batchmean) or, with ``padding_too=False``, over the non-padding ones."""
    pol, ref, mask = policy.logits.double().tolist(), reference.logits.double().tolist(), policy.attention_mask.tolist()
    total, count = 0.0, 0
    for b in range(len(mask)):
        for t in range(len(mask[b])):
            if mask[b][t] or padding_too:
                log_p, log_r = log_softmax64(pol[b][t]), log_softmax64(ref[b][t])
                total += sum(math.exp(r) * (r - p) for p, r in zip(log_p, log_r))
                count += 1
    return total / count


# ---------------------------------------------------------------- inputs
def output(seed: int, labels: list[list[int]], mask: list[list[int]], vocab: int = 7) -> ModelOutput:
    generator = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(len(labels), len(labels[0]), vocab, generator=generator)
    return ModelOutput(logits, torch.tensor(labels), torch.tensor(mask))


def inputs() -> MethodInputs:
    # Two forget rows (prompt 2 / 1 tokens, last row padded) and two retain rows, the second padded.
    forget = output(0, [[M, M, 3, 5, 1], [M, 2, 2, 6, M]], [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    retain_labels, retain_mask = [[M, 4, 0, 1, 2], [M, M, 6, M, M]], [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    retain = output(1, retain_labels, retain_mask)
    reference = output(2, retain_labels, retain_mask)
    return MethodInputs(policy={"forget": forget, "retain": retain}, reference={"retain": reference})


def single_token_output(p: torch.Tensor) -> ModelOutput:
    """One answer token whose label probability is exactly p (logits = log[p, 1 − p], label 0)."""
    logits = torch.stack([torch.log(p), torch.log1p(-p)]).reshape(1, 1, 2).expand(1, 2, 2)
    return ModelOutput(logits, torch.tensor([[M, 0]]), torch.ones(1, 2, dtype=torch.long))


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("divisor", [2.0, 3.0])
def test_uce_gradient_in_p_is_bounded_where_gradient_ascent_explodes(divisor):
    for value in [1e-6, 1e-3, 0.1, 0.5, 0.9, 0.999]:
        p = torch.tensor(value, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(unlearning_cross_entropy(single_token_output(p), divisor), p)
        # d/dp −log(1 − p/d) = 1/(d − p), inside [1/d, 1/(d − 1)] for every p in (0, 1); the log-probs are
        # computed in float32, hence rel 1e-5.
        assert grad.item() == pytest.approx(1.0 / (divisor - value), rel=1e-5)
        assert 1.0 / divisor <= grad.item() <= 1.0 / (divisor - 1.0)
        p = torch.tensor(value, dtype=torch.float64, requires_grad=True)
        (ga_grad,) = torch.autograd.grad(-nll(single_token_output(p)), p)  # GA: L = log p, dL/dp = 1/p
        assert ga_grad.item() == pytest.approx(1.0 / value, rel=1e-5)
    assert ga_grad.item() < 2.0  # at p = 0.999 both are tame …
    p = torch.tensor(1e-6, dtype=torch.float64, requires_grad=True)
    (ga_grad,) = torch.autograd.grad(-nll(single_token_output(p)), p)
    assert ga_grad.item() > 1e5  # … but GA's grows without bound as p → 0, UCE's stays ≤ 1/(d − 1) ≤ 1


def test_uce_stays_accurate_for_tiny_probabilities():
    # log p = −60: 1 − p/2 rounds to 1 in float32, log1p keeps L ≈ p/2 ≈ 4.4e-27.
    logits = torch.tensor([[[0.0, 60.0], [0.0, 0.0]]])  # position 0 scores label 0 with log p ≈ −60
    out = ModelOutput(logits, torch.tensor([[M, 0]]), torch.ones(1, 2, dtype=torch.long))
    value = unlearning_cross_entropy(out, 2.0).item()
    assert value > 0
    assert value == pytest.approx(uce64(out, 2.0), rel=1e-4)  # float32 log-softmax


@pytest.mark.parametrize("divisor", [2.0, 3.0])
def test_objectives_match_float64_transcriptions(divisor):
    method = build_method("mollm", divisor=divisor)
    batch = inputs()
    objectives = method.objectives(batch)
    assert list(objectives) == ["forget", "kl", "retain"]  # no coefficients: MGDA weighs them
    assert objectives["forget"].item() == pytest.approx(uce64(batch.policy["forget"], divisor), rel=1e-5)
    assert objectives["kl"].item() == pytest.approx(kl64(batch.policy["retain"], batch.reference["retain"]), rel=1e-5)
    assert objectives["retain"].item() == pytest.approx(nll64(batch.policy["retain"]), rel=1e-5)
    tokens = build_method("mollm", divisor=divisor, kl_reduction="tokens").objectives(batch)["kl"].item()
    assert tokens == pytest.approx(kl64(batch.policy["retain"], batch.reference["retain"], padding_too=False), rel=1e-5)


def test_the_reference_is_built_only_for_the_kl_objective():
    assert build_method("mollm").uses_reference()
    assert not build_method("mollm", kl=False).uses_reference()


def test_switched_off_objectives_are_absent_and_kl_off_needs_no_reference():
    batch = inputs()
    objectives = build_method("mollm", kl=False).objectives(MethodInputs(policy=batch.policy))
    assert list(objectives) == ["forget", "retain"]
    assert list(build_method("mollm", retain=False).objectives(batch)) == ["forget", "kl"]
    assert list(build_method("mollm", forget=False).objectives(batch)) == ["kl", "retain"]


@pytest.mark.parametrize("params", [
    {"kl": False, "retain": False},
    {"forget": False, "kl": False},
    {"forget": False, "kl": False, "retain": False},
    {"divisor": 1.0},
    {"divisor": 0.5},
])
def test_bad_hyperparameters_raise_value_error(params):
    with pytest.raises(ValueError, match="mollm"):
        build_method("mollm", **params)


def test_registration_and_default_space():
    assert "mollm" in method_names()
    cls = get_method_class("mollm")
    assert cls.combine == "mgda"
    assert cls.splits == ("forget", "retain") and cls.reference_splits == ("retain",)
    fields = set(cls.Params.__dataclass_fields__)
    for key, spec in cls.default_space.items():
        assert key in fields | TRAINER_KEYS
        (kind, values), = spec.items()
        if kind in ("choice", "grid"):
            for value in values:  # every listed value must build
                if key in fields:
                    build_method("mollm", **{key: value})
