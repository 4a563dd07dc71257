"""CE-U — cross-entropy unlearning (Yang et al. 2025, arXiv 2503.01224; open-unlearning ``CEU``).

Forget data only, no reference model. At each answer position, with y the true next token:
q_v = p_θ,v / (1 − p_θ,y) for v ≠ y, q_y = 0 (DETACHED: the model's own distribution without the true
token, renormalised); L = mean over positions of −Σ_v q_v log p_θ,v.

The target is computed as softmax of the logits with z_y set to −inf, which is the same q without dividing
by 1 − p_y (exact even when p_y rounds to 1). The gradient w.r.t. the logits is p − q: p_y on the true
token (descent lowers it), −p_v·p_y/(1 − p_y) on each other token. The first ``ignore_first_n_answer_tokens``
answer tokens of each example are left out (the trick of the paper's training-settings footnote, as
open-unlearning implements it), counted among the scored answer tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from methods.base import MethodInputs, UnlearningMethod, answer_positions, register_method


@dataclass(frozen=True)
class CEUParams:
    ignore_first_n_answer_tokens: int = 1  # n: leading answer tokens left out (open-unlearning's name, 1)

    def __post_init__(self) -> None:
        n = self.ignore_first_n_answer_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"ceu: ignore_first_n_answer_tokens must be an integer ≥ 0, got {n!r}")


@register_method("ceu")
class CEU(UnlearningMethod):
    """Cross-entropy towards the model's own next-token distribution with the true token removed."""

    Params: ClassVar[type] = CEUParams
    splits: ClassVar[tuple[str, ...]] = ("forget",)
    # No retain term, so lr sets how far it goes: TOFU's 1e-5 up to ~1e-3 for the embedded tiny models.
    # n: the paper's 1, or every answer token (0), or a longer prefix (2).
    default_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lr": {"loguniform": [1e-5, 1e-3]},
        "epochs": {"choice": [5, 10]},
        "ignore_first_n_answer_tokens": {"choice": [0, 1, 2]},
    }

    def objectives(self, inputs: MethodInputs) -> dict[str, torch.Tensor]:
        logits, labels, answer = answer_positions(inputs.policy["forget"])  # [batch, seq-1, vocab], [batch, seq-1] ×2
        # Answer positions after the first n of each example (cumulative count along the sequence).
        kept = (answer > 0) & (answer.cumsum(-1) > self.params.ignore_first_n_answer_tokens)
        z, y = logits[kept], labels[kept]  # [n, vocab], [n]: the temporaries below skip prompt and padding
        # q = softmax(z with z_y = −inf), detached: a constant target.
        target = torch.softmax(z.detach().scatter(-1, y.unsqueeze(-1), float("-inf")), dim=-1)
        cross_entropy = -(target * torch.log_softmax(z, dim=-1)).sum(-1)  # [n]; its mean is 0 when n = 0
        return {"forget": cross_entropy.sum() / max(cross_entropy.numel(), 1)}
