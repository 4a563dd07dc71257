"""SimNPO — simple, reference-free NPO (Fan et al. 2024, arXiv 2410.07163; OPTML-Group/Unlearn-Simple).

L_f = −(2/β)·E_f log σ(−(β/|y|)·log π_θ(y|x) − γ);   total = c·L_f + α·NLL(D_r).

Defaults are open-unlearning's (β 4.5, γ 0, c 0.125, α 1). The authors' TOFU config uses β 2.5, γ 0,
c 0.1375 (their ``npo_coeff``). Naming: ``gamma`` is the paper's reward margin γ; ``npo_coeff`` is the
forget-term coefficient c as the authors' code names it (open-unlearning calls it ``gamma`` and calls the
margin ``delta``, entering as β·delta: open-unlearning's delta = our γ/β; equal at the default 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from methods.base import MethodInputs, UnlearningMethod, answer_lengths, nll, register_method, sequence_logprob


@dataclass(frozen=True)
class SimNPOParams:
    beta: float = 4.5  # β: inverse temperature on the length-normalised log-likelihood
    gamma: float = 0.0  # γ: reward margin inside the sigmoid (paper's γ)
    npo_coeff: float = 0.125  # c: weight of the forget term (authors' ``npo_coeff``)
    alpha: float = 1.0  # α: weight of the retain NLL (the paper's λ)

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"simnpo: beta must be > 0, got {self.beta}")
        if self.npo_coeff < 0 or self.alpha < 0:
            raise ValueError(f"simnpo: npo_coeff and alpha must be ≥ 0, got {self.npo_coeff}, {self.alpha}")


@register_method("simnpo")
class SimNPO(UnlearningMethod):
    """NPO with the reference replaced by length normalisation and a margin; no reference model."""

    Params: ClassVar[type] = SimNPOParams
    splits: ClassVar[tuple[str, ...]] = ("forget", "retain")
    # beta between the authors' TOFU 2.5 and open-unlearning's 4.5; npo_coeff around both defaults
    # (0.125 / 0.1375); gamma 0 in both, the paper also reports small positive margins; lr from TOFU's 1e-5
    # up to ~1e-3 for the embedded tiny models.
    default_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lr": {"loguniform": [1e-5, 1e-3]},
        "epochs": {"choice": [5, 10]},
        "beta": {"choice": [2.5, 3.5, 4.5]},
        "gamma": {"choice": [0.0, 1.0]},
        "npo_coeff": {"choice": [0.1, 0.125, 0.1375, 0.25]},
        "alpha": {"choice": [1.0, 2.0]},
    }

    def objectives(self, inputs: MethodInputs) -> dict[str, torch.Tensor]:
        p = self.params
        forget_out = inputs.policy["forget"]
        # (1/|y|)·log π_θ(y|x): mean answer-token log-prob per example [batch].
        mean_logprob = sequence_logprob(forget_out) / answer_lengths(forget_out)
        forget = -(2.0 / p.beta) * F.logsigmoid(-p.beta * mean_logprob - p.gamma).mean()
        return {"forget": p.npo_coeff * forget, "retain": p.alpha * nll(inputs.policy["retain"])}
