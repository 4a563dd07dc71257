"""KL — gradient ascent plus a KL anchor to the reference on retain inputs (open-unlearning ``GradDiff``
with ``retain_loss_type: KL``): L = −NLL(D_f) + α·KL(p_ref ‖ p_θ) on D_r, token-level, averaged over
batch·seq positions (padding included) as open-unlearning does; ``kl_reduction: tokens`` averages non-padding only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from methods.base import KL_REDUCTIONS, MethodInputs, UnlearningMethod, kl_to_reference, nll, register_method


@dataclass(frozen=True)
class KLParams:
    alpha: float = 1.0  # α: weight of KL(p_ref ‖ p_θ) on retain inputs
    # "batchmean": over all batch·seq positions, padding included (open-unlearning); "tokens": non-padding only.
    kl_reduction: str = "batchmean"

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"kl: alpha must be ≥ 0, got {self.alpha}")
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl: kl_reduction must be one of {KL_REDUCTIONS}, got {self.kl_reduction!r}")


@register_method("kl")
class KL(UnlearningMethod):
    """Ascend on the forget answers; keep the retain next-token distributions close to the reference's."""

    Params: ClassVar[type] = KLParams
    splits: ClassVar[tuple[str, ...]] = ("forget", "retain")
    reference_splits: ClassVar[tuple[str, ...]] = ("retain",)
    # lr: TOFU 1e-5 (METHODS.md) up to ~1e-3 for the embedded tiny models; alpha around open-unlearning's 1.
    default_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lr": {"loguniform": [1e-5, 1e-3]},
        "epochs": {"choice": [5, 10]},
        "alpha": {"choice": [0.5, 1.0, 2.0, 5.0]},
    }

    def objectives(self, inputs: MethodInputs) -> dict[str, torch.Tensor]:
        retain = self.params.alpha * kl_to_reference(inputs.policy["retain"], inputs.reference["retain"],
                                                   self.params.kl_reduction)
        return {"forget": -nll(inputs.policy["forget"]), "retain": retain}
