r"""RMU — representation misdirection for unlearning (Li et al. 2024, WMDP, arXiv 2403.03218;
open-unlearning ``RMU``).

At decoder layer ℓ, steer forget activations to a fixed random direction and pin retain activations to
the reference's: L = MSE(h_ℓ(x_f), c·u) + α·MSE(h_ℓ(x_r), h_ℓ^ref(x_r)), u ~ U[0,1)^d normalised to 1.
Defaults follow open-unlearning's TOFU setting (ℓ = 7, c = 2, α = 1, all parameters, answer tokens only).
The WMDP original uses ℓ = 7, c = 6.5, α = 1200, lr 5e-5 and trains only
``param_pattern = r"layers\.(5|6|7)\.mlp\.down_proj"``.

Layer convention: ``layer`` indexes ``model.layers`` from 0 and h_ℓ is that decoder layer's OUTPUT (what
WMDP/open-unlearning hook on ``model.layers.7``). In HF ``output_hidden_states`` that is
``hidden_states[layer + 1]`` (index 0 is the embeddings), so ``hidden_layer`` returns ``layer + 1`` and
the worker hands over ``hidden_states[hidden_layer]``. (For the last layer transformers 5.x puts the
final-norm output there instead.)

Token mask: ``hidden[:, t]`` is the state after reading input token t, and labels are the UNSHIFTED
input ids (IGNORE_INDEX on prompt and padding), so ``labels != IGNORE_INDEX`` selects the positions that
hold answer tokens, EOS included. No shift is applied (the logit terms shift because position t scores
token t+1; a hidden state is not a prediction). This is open-unlearning's TOFU masking exactly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from methods.base import IGNORE_INDEX, MethodInputs, ModelOutput, UnlearningMethod, register_method


@dataclass(frozen=True)
class RMUParams:
    layer: int = 7  # ℓ: 0-based index into model.layers whose output is steered
    steering_coeff: float = 2.0  # c: norm of the forget target c·u (WMDP: 6.5)
    alpha: float = 1.0  # α: weight of the retain activation MSE (WMDP: 1200)
    param_pattern: str = ".*"  # re.search over parameter names: which ones train (WMDP: see module doc)
    seed: int = 0  # seeds the torch.Generator that draws u

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise ValueError(f"rmu: layer must be ≥ 0, got {self.layer}")
        if self.steering_coeff <= 0:
            raise ValueError(f"rmu: steering_coeff must be > 0, got {self.steering_coeff}")
        if self.alpha < 0:
            raise ValueError(f"rmu: alpha must be ≥ 0, got {self.alpha}")
        try:
            re.compile(self.param_pattern)
        except re.error as err:
            raise ValueError(f"rmu: param_pattern {self.param_pattern!r} is not a regular expression: {err}") from None


def random_direction(hidden_size: int, seed: int) -> torch.Tensor:
    """u: entries U[0,1) from a generator seeded with ``seed``, scaled to unit L2 norm [hidden] (float32, CPU)."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(hidden_size, generator=generator, dtype=torch.float32)
    return u / u.norm()


def answer_activation_mse(hidden: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over the hidden size, then over each example's answer positions, then the batch.

    hidden, target: [batch, seq, hidden]; labels: [batch, seq]. Per-example averaging (not per token over the
    batch) is open-unlearning's ``compute_activation_loss``.
    """
    mask = (labels != IGNORE_INDEX).to(torch.float32)  # [batch, seq]
    per_position = (hidden.float() - target.float()).pow(2).mean(-1)  # [batch, seq]
    per_example = (per_position * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return per_example.mean()


@register_method("rmu")
class RMU(UnlearningMethod):
    """Scramble layer-ℓ activations on forget answers; keep them unchanged on retain answers."""

    Params: ClassVar[type] = RMUParams
    splits: ClassVar[tuple[str, ...]] = ("forget", "retain")
    reference_splits: ClassVar[tuple[str, ...]] = ("retain",)
    # steering_coeff from open-unlearning's TOFU 2 to WMDP's 6.5 (larger targets for wider models); alpha from
    # 1 (TOFU) towards WMDP's 1200; lr from WMDP's 5e-5 and TOFU's 1e-5 up to ~1e-3 for the embedded tiny
    # models. ``layer`` stays out: it depends on the model's depth (set it in the spec for small models).
    default_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lr": {"loguniform": [1e-5, 1e-3]},
        "epochs": {"choice": [5, 10]},
        "steering_coeff": {"choice": [2.0, 6.5, 20.0]},
        "alpha": {"loguniform": [1.0, 1200.0]},
    }

    def __init__(self, params: RMUParams) -> None:
        super().__init__(params)
        self._direction: torch.Tensor | None = None  # u, drawn once the hidden size is known, then fixed

    @property
    def hidden_layer(self) -> int:
        # Index into HF hidden_states of the output of model.layers[layer] (see the module docstring).
        return self.params.layer + 1

    def trainable(self, parameter_name: str) -> bool:
        return re.search(self.params.param_pattern, parameter_name) is not None

    def direction(self, hidden_size: int) -> torch.Tensor:
        """The fixed unit direction u [hidden]; created on first use from ``params.seed``."""
        if self._direction is None:
            self._direction = random_direction(hidden_size, self.params.seed)
        if self._direction.numel() != hidden_size:
            raise ValueError(f"rmu: hidden size changed from {self._direction.numel()} to {hidden_size}")
        return self._direction

    def objectives(self, inputs: MethodInputs) -> dict[str, torch.Tensor]:
        p = self.params
        forget_out, retain_out = inputs.policy["forget"], inputs.policy["retain"]
        forget_hidden = require_hidden(forget_out, "forget")
        steer = p.steering_coeff * self.direction(forget_hidden.shape[-1]).to(forget_hidden.device)
        forget = answer_activation_mse(forget_hidden, steer.expand_as(forget_hidden), forget_out.labels)
        retain_target = require_hidden(inputs.reference["retain"], "reference retain")
        retain = answer_activation_mse(require_hidden(retain_out, "retain"), retain_target, retain_out.labels)
        return {"forget": forget, "retain": p.alpha * retain}


def require_hidden(out: ModelOutput, what: str) -> torch.Tensor:
    if out.hidden is None:
        raise ValueError(f"rmu: the {what} output carries no hidden states (hidden_layer was not honoured)")
    return out.hidden
