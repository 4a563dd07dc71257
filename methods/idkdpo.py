"""IdkDPO — DPO (Rafailov et al. 2023) with an "I don't know" answer preferred over the forget answer, the
unlearning baseline of Zhang et al. 2024 (NPO, arXiv 2404.05868) and open-unlearning's ``DPO`` on IDK data:

L = −(2/β)·E log σ(β·[(log π_θ(y_idk) − log π_ref(y_idk)) − (log π_θ(y_f) − log π_ref(y_f))])
    + α·NLL(D_r).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from methods.base import MethodInputs, UnlearningMethod, nll, register_method, sequence_logprob


@dataclass(frozen=True)
class IdkDPOParams:
    beta: float = 0.1  # β: DPO inverse temperature (open-unlearning: 0.1)
    alpha: float = 1.0  # α: weight of the retain NLL

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"idkdpo: beta must be > 0, got {self.beta}")
        if self.alpha < 0:
            raise ValueError(f"idkdpo: alpha must be ≥ 0, got {self.alpha}")


@register_method("idkdpo")
class IdkDPO(UnlearningMethod):
    """DPO preferring a refusal over the forget answer, plus the retain NLL.

    The template batch pairs each forget question with a refusal line: the chosen answer."""

    Params: ClassVar[type] = IdkDPOParams
    splits: ClassVar[tuple[str, ...]] = ("forget", "template", "retain")
    reference_splits: ClassVar[tuple[str, ...]] = ("forget", "template")
    # beta as NPO's sweep (same DPO temperature); lr from TOFU's 1e-5 up to ~1e-3 for the embedded tiny models.
    default_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lr": {"loguniform": [1e-5, 1e-3]},
        "epochs": {"choice": [5, 10]},
        "beta": {"choice": [0.05, 0.1, 0.5]},
        "alpha": {"choice": [1.0, 2.0, 5.0]},
    }

    def objectives(self, inputs: MethodInputs) -> dict[str, torch.Tensor]:
        beta = self.params.beta
        policy, reference = inputs.policy, inputs.reference
        # Per-example log-ratios to the reference, answer-token sums [batch].
        chosen = sequence_logprob(policy["template"]) - sequence_logprob(reference["template"])
        rejected = sequence_logprob(policy["forget"]) - sequence_logprob(reference["forget"])
        forget = -(2.0 / beta) * F.logsigmoid(beta * (chosen - rejected)).mean()
        return {"forget": forget, "retain": self.params.alpha * nll(policy["retain"])}
