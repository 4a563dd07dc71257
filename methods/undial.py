"""UNDIAL — unlearning via self-distillation on adjusted logits (Dong et al. 2024, arXiv 2402.10052;
open-unlearning ``UNDIAL``).

q_t = softmax(z_ref,t − β·onehot(y_{t+1}))   (the frozen reference's logits, detached)
L_f = mean over answer positions of CE(p_θ,t, q_t) = −Σ_v q_t,v log p_θ,t,v;   total = γ·L_f + α·NLL(D_r).

The student is pulled towards the reference's own distribution with the true next token's logit lowered by
β, so it forgets that token and keeps the rest of the distribution. Positions: open-unlearning applies the
loss at every position of the padded batch (prompt and padding included, where the −100 label wraps around
to penalise vocabulary id V−100). We average over answer positions by default; ``all_positions = True``
averages over every non-padding position instead, and at prompt positions (no answer token to forget)
the target is the reference's distribution unchanged — pure self-distillation there, no wrapped label.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from methods.base import MethodInputs, UnlearningMethod, answer_positions, nll, register_method


@dataclass(frozen=True)
class UNDIALParams:
    beta: float = 10.0  # β: logit penalty on the true token (open-unlearning 10; paper grid 3 / 10 / 30)
    gamma: float = 1.0  # γ: weight of the distillation (forget) term
    alpha: float = 0.0  # α: weight of the retain NLL (open-unlearning 0: the paper uses no retain term)
    all_positions: bool = False  # False: answer positions only; True: every non-padding position (see above)

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"undial: beta must be > 0 (β = 0 distils the reference unchanged), got {self.beta}")
        if self.gamma < 0 or self.alpha < 0:
            raise ValueError(f"undial: gamma and alpha must be ≥ 0, got gamma={self.gamma}, alpha={self.alpha}")


@register_method("undial")
class UNDIAL(UnlearningMethod):
    """Distil the reference's next-token distribution with the true answer token's logit lowered by β."""

    Params: ClassVar[type] = UNDIALParams
    # retain is read even at the default α = 0 (the split list is fixed per class) so α can be swept.
    splits: ClassVar[tuple[str, ...]] = ("forget", "retain")
    reference_splits: ClassVar[tuple[str, ...]] = ("forget",)
    # beta: the paper's grid. lr: the paper trains LoRA at 1e-4; TOFU full fine-tuning 1e-5, the embedded
    # tiny models up to ~1e-3. alpha: open-unlearning's 0, or a retain term of weight 1.
    default_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lr": {"loguniform": [1e-5, 1e-3]},
        "epochs": {"choice": [5, 10]},
        "beta": {"choice": [3.0, 10.0, 30.0]},
        "alpha": {"choice": [0.0, 1.0]},
    }

    def objectives(self, inputs: MethodInputs) -> dict[str, torch.Tensor]:
        p = self.params
        forget_out = inputs.policy["forget"]
        logits, labels, answer = answer_positions(forget_out)  # [batch, seq-1, vocab], [batch, seq-1] ×2
        ref_logits, _, _ = answer_positions(inputs.reference["forget"])
        if p.all_positions:  # position t predicts a real token from a real token (right padding)
            attention = forget_out.attention_mask.bool()
            positions = attention[:, :-1] & attention[:, 1:]
        else:
            positions = answer.bool()
        # Only the averaged positions' rows, [n, vocab]: the [n, vocab] temporaries below then skip padding.
        z, z_ref, y, is_answer = logits[positions], ref_logits[positions].detach(), labels[positions], answer[positions]
        # z_ref − β·onehot(y_{t+1}), the penalty on answer positions only; detached: the target is a constant.
        target = torch.softmax(z_ref.scatter_add(-1, y.unsqueeze(-1), (-p.beta * is_answer).unsqueeze(-1)), dim=-1)
        cross_entropy = -(target * torch.log_softmax(z, dim=-1)).sum(-1)  # [n]
        return {"forget": p.gamma * cross_entropy.sum() / max(cross_entropy.numel(), 1),
                "retain": p.alpha * nll(inputs.policy["retain"])}
