"""AltPO — alternate preference optimization (Mekala et al. 2024, arXiv 2409.13474; open-unlearning's DPO
trainer on alternate-answer data):

L = −(2/β)·E log σ(β·[(log π_θ(ỹ|x) − log π_ref(ỹ|x)) − (log π_θ(y|x) − log π_ref(y|x))])
    + α·NLL(D_r),

ỹ an alternate (made-up) answer to the forget question, preferred over the true answer y. Instead of a
refusal (IdkDPO) the model learns to answer with different facts, which keeps its answers fluent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from methods.base import MethodInputs, UnlearningMethod, nll, register_method, sequence_logprob


@dataclass(frozen=True)
class AltPOParams:
    beta: float = 0.1  # β: DPO inverse temperature (paper and open-unlearning: 0.1)
    alpha: float = 1.0  # α: weight of the retain NLL

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"altpo: beta must be > 0, got {self.beta}")
        if self.alpha < 0:
            raise ValueError(f"altpo: alpha must be ≥ 0, got {self.alpha}")


@register_method("altpo")
class AltPO(UnlearningMethod):
    """DPO preferring a made-up alternate answer over the forget answer, plus the retain NLL.

    The alternate batch pairs each forget question with that alternate: the chosen answer."""

    Params: ClassVar[type] = AltPOParams
    splits: ClassVar[tuple[str, ...]] = ("forget", "alternate", "retain")
    reference_splits: ClassVar[tuple[str, ...]] = ("forget", "alternate")
    # beta and alpha: open-unlearning's AltPO sweep (beta 0.05 / 0.1 / 0.5, alpha 1 / 2 / 5, 2 epochs at
    # lr 1e-5 … 5e-5); lr up to ~1e-3 for the embedded tiny models.
    default_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lr": {"loguniform": [1e-5, 1e-3]},
        "epochs": {"choice": [2, 5, 10]},
        "beta": {"choice": [0.05, 0.1, 0.5]},
        "alpha": {"choice": [1.0, 2.0, 5.0]},
    }

    def objectives(self, inputs: MethodInputs) -> dict[str, torch.Tensor]:
        beta = self.params.beta
        policy, reference = inputs.policy, inputs.reference
        # Per-example log-ratios to the reference, answer-token sums [batch].
        chosen = sequence_logprob(policy["alternate"]) - sequence_logprob(reference["alternate"])
        rejected = sequence_logprob(policy["forget"]) - sequence_logprob(reference["forget"])
        forget = -(2.0 / beta) * F.logsigmoid(beta * (chosen - rejected)).mean()
        return {"forget": forget, "retain": self.params.alpha * nll(policy["retain"])}
