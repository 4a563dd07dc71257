"""GA — gradient ascent on the forget set (open-unlearning ``GradAscent``): L = −NLL(D_f)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from methods.base import MethodInputs, UnlearningMethod, nll, register_method


@dataclass(frozen=True)
class GAParams:
    """GA has no hyperparameter of its own; only the trainer's lr / epochs / weight decay."""


@register_method("ga")
class GA(UnlearningMethod):
    """Maximise the forget answers' NLL (minimise its negative); unbounded below, so it collapses the model."""

    Params: ClassVar[type] = GAParams
    splits: ClassVar[tuple[str, ...]] = ("forget",)
    # TOFU recipes train at lr 1e-5 for 10 epochs (open-unlearning, METHODS.md); the embedded tiny models
    # need up to ~1e-3, so the range spans both.
    default_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lr": {"loguniform": [1e-5, 1e-3]},
        "epochs": {"choice": [5, 10]},
    }

    def objectives(self, inputs: MethodInputs) -> dict[str, torch.Tensor]:
        return {"forget": -nll(inputs.policy["forget"])}
