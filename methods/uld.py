"""ULD: unlearning from logit difference (Ji et al. 2024, arXiv 2406.08607; UCSB-NLP-Chang/ULD).

A small assistant (the target's first K layers + LoRA) is trained on REVERSED goals: remember the forget
set, forget the retain set (uniform next-token distribution). Evaluation then scores the composite
``target − alpha·assistant`` on the target's relative-top tokens (orchestrator/uld.py); the target itself
is never updated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from methods.base import MethodInputs, ModelOutput, UnlearningMethod, nll, register_method


@dataclass(frozen=True)
class ULDParams:
    # Weight of the assistant's logits in target − alpha·assistant (paper, TOFU: 0.75; repo scripts: 0.8).
    alpha: float = 0.75
    # Relative-top filter rate r: only the target's top ⌈r·V⌉ tokens or those with log-prob ≥ max + log r
    # get the assistant subtracted.
    filter_rate: float = 0.01
    # K decoder layers copied from the target; 0 means a quarter of the target's depth (at least 1).
    assistant_layers: int = 0
    # w on the uniform-distribution term over D'_r (paper: 6.5; repo code: 5.0).
    retain_weight: float = 6.5
    # LoRA on every linear layer of the assistant's decoder layers (paper r = 32, α = 32; repo r = 16).
    lora_rank: int = 32
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"uld: alpha must be ≥ 0, got {self.alpha}")
        if not 0 < self.filter_rate <= 1:
            raise ValueError(f"uld: filter_rate must be in (0, 1], got {self.filter_rate}")
        if self.assistant_layers < 0:
            raise ValueError(f"uld: assistant_layers must be ≥ 0 (0 = a quarter of the target), got {self.assistant_layers}")
        if self.retain_weight < 0:
            raise ValueError(f"uld: retain_weight must be ≥ 0, got {self.retain_weight}")
        if self.lora_rank < 1:
            raise ValueError(f"uld: lora_rank must be ≥ 1, got {self.lora_rank}")
        if self.lora_alpha <= 0:
            raise ValueError(f"uld: lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"uld: lora_dropout must be in [0, 1), got {self.lora_dropout}")


def uniform_cross_entropy(out: ModelOutput) -> torch.Tensor:
    """CE(U, p) = −(1/V)·Σ_v log p_v at every non-padding position, averaged over those positions.

    Differs from the repo's KL(U ‖ p) only by the constant log V, so the gradient is the same.
    """
    logprobs = torch.log_softmax(out.logits.float(), dim=-1)  # [batch, seq, vocab]
    per_position = -logprobs.mean(-1)  # [batch, seq]
    mask = out.attention_mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1.0)


@register_method("uld")
class ULD(UnlearningMethod):
    """min_φ CE(D'_f) + w·CE(U, p_assistant) on D'_r — the assistant learns what the target must forget."""

    Params: ClassVar[type] = ULDParams
    splits: ClassVar[tuple[str, ...]] = ("forget_augmented", "retain_augmented")
    trains: ClassVar[str] = "assistant"
    default_space: ClassVar[dict[str, dict[str, Any]]] = {
        "alpha": {"choice": [0.5, 0.75, 1.0]},
        # 0 = a quarter of the target's depth; 2 stays valid for any target with at least 2 layers.
        "assistant_layers": {"choice": [0, 2]},
        "retain_weight": {"choice": [5.0, 6.5]},
        "lora_rank": {"choice": [16, 32]},
        # The paper trains the LoRA assistant at 1e-3; on small targets 3e-3 over 20 epochs was needed
        # before the assistant remembered the forget answers at all.
        "lr": {"loguniform": [3e-4, 3e-3]},
        "epochs": {"choice": [5, 10, 20]},
    }

    def objectives(self, inputs: MethodInputs) -> dict[str, torch.Tensor]:
        forget = nll(inputs.policy["forget_augmented"])
        retain = self.params.retain_weight * uniform_cross_entropy(inputs.policy["retain_augmented"])
        return {"forget": forget, "retain": retain}
