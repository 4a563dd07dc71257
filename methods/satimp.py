"""SatImp — saturation × importance token weighting (Yang et al. 2025, arXiv 2505.11953; open-unlearning
``SatImp``).

Per answer token ℓ_t = −log p_t; w_t = p_t^β1 · (1 − p_t)^β2, DETACHED (a per-token constant);
L_f = −tokmean(w_t · ℓ_t);   total = γ·L_f + α·NLL(D_r).

tokmean is the mean over every answer token of the batch, not of per-example means. The weight peaks at
p_t = β1/(β1 + β2) (5/6 at the defaults): tokens the model still predicts get the ascent, tokens already
forgotten (p_t → 0) almost none, so unlike plain ascent the forget gradient fades instead of exploding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from methods.base import MethodInputs, UnlearningMethod, answer_token_logprobs, nll, register_method, token_mean


@dataclass(frozen=True)
class SatImpParams:
    beta1: float = 5.0  # β1: exponent of the saturation factor p_t
    beta2: float = 1.0  # β2: exponent of the importance factor 1 − p_t
    gamma: float = 1.0  # γ: weight of the forget term
    # α: weight of the retain NLL. 0.1 as in the paper and open-unlearning's SatImp class; open-unlearning's
    # SatImp.yaml swaps the two (gamma 0.1, alpha 1.0) — set gamma=0.1, alpha=1.0 to reproduce that config.
    alpha: float = 0.1

    def __post_init__(self) -> None:
        if self.beta1 < 0 or self.beta2 < 0:
            raise ValueError(f"satimp: beta1 and beta2 must be ≥ 0, got beta1={self.beta1}, beta2={self.beta2}")
        if self.gamma < 0 or self.alpha < 0:
            raise ValueError(f"satimp: gamma and alpha must be ≥ 0, got gamma={self.gamma}, alpha={self.alpha}")


@register_method("satimp")
class SatImp(UnlearningMethod):
    """Gradient ascent on the forget answers, each token weighted by p^β1·(1−p)^β2 (weights held constant)."""

    Params: ClassVar[type] = SatImpParams
    splits: ClassVar[tuple[str, ...]] = ("forget", "retain")
    # open-unlearning trains 5 epochs at lr 1e-5; up to ~1e-3 for the embedded tiny models. beta1 around the
    # default 5, beta2 0 (saturation only) or 1; (gamma, alpha) covers the paper's (1, 0.1) and the YAML's
    # (0.1, 1).
    default_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lr": {"loguniform": [1e-5, 1e-3]},
        "epochs": {"choice": [5, 10]},
        "beta1": {"choice": [1.0, 3.0, 5.0]},
        "beta2": {"choice": [0.0, 1.0]},
        "gamma": {"choice": [0.1, 1.0]},
        "alpha": {"choice": [0.1, 1.0]},
    }

    def objectives(self, inputs: MethodInputs) -> dict[str, torch.Tensor]:
        p = self.params
        logprobs, mask = answer_token_logprobs(inputs.policy["forget"])  # [batch, seq-1]; 0 where masked
        prob = logprobs.detach().exp()
        weight = prob.pow(p.beta1) * (1.0 - prob).pow(p.beta2)  # detached: the gradient is −w_t·∂ℓ_t
        forget = -token_mean(weight * -logprobs, mask)
        return {"forget": p.gamma * forget, "retain": p.alpha * nll(inputs.policy["retain"])}
