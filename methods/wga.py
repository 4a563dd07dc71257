"""WGA — weighted gradient ascent (Wang et al. 2025, arXiv 2502.19301; open-unlearning ``WGA``).

L_f = tokmean(p_t^β · log p_t), the weight p_t^β DETACHED;   total = γ·L_f + α·NLL(D_r).

tokmean is the mean over every answer token of the batch. Its gradient −p_t^β·∂(−log p_t) is ascent whose
force fades as a token becomes improbable (β = 0 is plain gradient ascent), so it does not run away.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from methods.base import MethodInputs, UnlearningMethod, answer_token_logprobs, nll, register_method, token_mean


@dataclass(frozen=True)
class WGAParams:
    beta: float = 1.0  # β: exponent of the token weight p_t^β
    gamma: float = 1.0  # γ: weight of the forget term
    alpha: float = 1.0  # α: weight of the retain NLL

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError(f"wga: beta must be ≥ 0, got {self.beta}")
        if self.gamma < 0 or self.alpha < 0:
            raise ValueError(f"wga: gamma and alpha must be ≥ 0, got gamma={self.gamma}, alpha={self.alpha}")


@register_method("wga")
class WGA(UnlearningMethod):
    """Gradient ascent on the forget answers, each token weighted by its own probability to the power β."""

    Params: ClassVar[type] = WGAParams
    splits: ClassVar[tuple[str, ...]] = ("forget", "retain")
    # open-unlearning trains 5 epochs at lr 1e-5; up to ~1e-3 for the embedded tiny models. beta around the
    # default 1 (0.5 closer to plain ascent, 2–5 fading faster); alpha around the default 1.
    default_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lr": {"loguniform": [1e-5, 1e-3]},
        "epochs": {"choice": [5, 10]},
        "beta": {"choice": [0.5, 1.0, 2.0, 5.0]},
        "alpha": {"choice": [1.0, 2.0, 5.0]},
    }

    def objectives(self, inputs: MethodInputs) -> dict[str, torch.Tensor]:
        p = self.params
        logprobs, mask = answer_token_logprobs(inputs.policy["forget"])  # [batch, seq-1]; 0 where masked
        weight = logprobs.detach().exp().pow(p.beta)  # detached: the gradient is p_t^β·∂ log p_t
        forget = token_mean(weight * logprobs, mask)
        return {"forget": p.gamma * forget, "retain": p.alpha * nll(inputs.policy["retain"])}
