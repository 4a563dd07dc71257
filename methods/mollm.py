"""MOLLM — multi-objective LLM unlearning (Pan et al., ICASSP 2025, arXiv 2412.20412; no code released).

Three objectives, each switchable (at least two stay on):

    forget  L_UCE = −mean over forget answer tokens of log(1 − p_θ(y_t|x, y_<t) / d)
    kl      L_KL  = KL(p_ref ‖ p_θ) on retain inputs (token level, every non-padding position)
    retain  L_rt  = NLL on retain answers

Unlearning cross-entropy replaces gradient ascent: d/dp [−log(1 − p/d)] = 1/(d − p) ∈ [1/d, 1/(d − 1)]
for p ∈ [0, 1], where ascent's d/dp log p = 1/p explodes as p → 0. L_UCE ≥ 0 is least at p = 0, so it
pushes the forget answer towards improbable with a bounded force instead of GA's runaway. What is
uncertain: the divisor. The form comes from the first author's FedOSD code (d = 2); whether
the MOLLM paper keeps "/2" is unconfirmed, so ``divisor`` is exposed (d > 1 keeps the log finite).

The objectives carry no coefficients: the worker combines them with the min-norm common descent
direction (MGDA, dual form; ``combine = "mgda"``, orchestrator/multiobjective.py): λ on the simplex
minimising ‖Σ λ_i g_i‖², one step along −Σ λ_i g_i, which increases no objective to first order.
At the start θ = θ_ref, so the KL's gradient is rounding noise; that module leaves such an objective out
until its gradient is real (pure MGDA would put all weight on it and never move). ``normalize_gradients``
(default on) rescales the gradients to equal norm before solving, as the author's FedOSD code does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from methods.base import (
    KL_REDUCTIONS,
    MethodInputs,
    ModelOutput,
    UnlearningMethod,
    answer_token_logprobs,
    kl_to_reference,
    nll,
    register_method,
)

OBJECTIVES = ("forget", "kl", "retain")


@dataclass(frozen=True)
class MOLLMParams:
    divisor: float = 2.0  # d in log(1 − p/d): FedOSD's UCE uses 2 (unconfirmed for the paper), must be > 1
    forget: bool = True  # unlearning cross-entropy on the forget answers
    kl: bool = True  # KL(p_ref ‖ p_θ) on retain inputs (needs the frozen reference)
    retain: bool = True  # NLL on the retain answers
    # Rescale the objectives' gradients to equal norm before MGDA (the author's FedOSD code does). Default on:
    # without it the bounded forget gradient is the smallest, gets λ ≈ 1, and Adam turns that into full-size
    # steps against utility (embedded forget10, lr 5e-4, 10 epochs: utility loss 0.57 off vs 0.04 on).
    normalize_gradients: bool = True
    kl_reduction: str = "batchmean"  # KL averaged over batch·seq positions (open-unlearning) or "tokens"

    def __post_init__(self) -> None:
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"mollm: kl_reduction must be one of {KL_REDUCTIONS}, got {self.kl_reduction!r}")
        if not self.divisor > 1.0:
            raise ValueError(f"mollm: divisor must be > 1 (log(1 − p/d) is undefined at p = 1 otherwise), "
                             f"got {self.divisor}")
        active = self.active_objectives()
        if len(active) < 2:
            raise ValueError(f"mollm: at least two of {', '.join(OBJECTIVES)} must be on (a common descent "
                             f"direction needs several objectives), got {list(active) or 'none'}")

    def active_objectives(self) -> tuple[str, ...]:
        return tuple(name for name in OBJECTIVES if getattr(self, name))


def unlearning_cross_entropy(out: ModelOutput, divisor: float) -> torch.Tensor:
    """L_UCE = −Σ log(1 − p_t/d) / (number of answer tokens) over the batch, p_t the label token's probability.

    log1p(−exp(log p)/d) keeps precision when p is tiny, where 1 − p/d rounds to 1.
    """
    logprobs, mask = answer_token_logprobs(out)  # [batch, seq-1]; masked positions hold log p = 0
    per_token = -torch.log1p(-torch.exp(logprobs) / divisor) * mask
    return per_token.sum() / mask.sum().clamp(min=1.0)


@register_method("mollm")
class MOLLM(UnlearningMethod):
    """Forget with bounded-gradient UCE while keeping utility, all objectives balanced by MGDA weights."""

    Params: ClassVar[type] = MOLLMParams
    splits: ClassVar[tuple[str, ...]] = ("forget", "retain")
    # The KL objective's reference (built only when ``kl`` is on: see uses_reference).
    reference_splits: ClassVar[tuple[str, ...]] = ("retain",)
    combine: ClassVar[str] = "mgda"
    # lr as for the other methods (TOFU's 1e-5 up to ~1e-3 for the embedded tiny models); divisor 2 (FedOSD)
    # or 3 (a gentler forget gradient, 1/(3 − p) ∈ [⅓, ½]); both gradient scalings.
    default_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lr": {"loguniform": [1e-5, 1e-3]},
        "epochs": {"choice": [5, 10]},
        "divisor": {"choice": [2.0, 3.0]},
        "normalize_gradients": {"choice": [False, True]},
    }

    def uses_reference(self) -> bool:
        return self.params.kl

    def objectives(self, inputs: MethodInputs) -> dict[str, torch.Tensor]:
        params = self.params
        objectives: dict[str, torch.Tensor] = {}
        if params.forget:
            objectives["forget"] = unlearning_cross_entropy(inputs.policy["forget"], params.divisor)
        if params.kl:
            objectives["kl"] = kl_to_reference(inputs.policy["retain"], inputs.reference["retain"], params.kl_reduction)
        if params.retain:
            objectives["retain"] = nll(inputs.policy["retain"])
        return objectives
