"""PDU — primal-dual unlearning (Entesari et al. 2025, arXiv 2506.05314; open-unlearning ``PDU``).

Constrained problem: min L_f subject to NLL(D_r) ≤ ε, with the logit-margin flattening loss
L_f = mean over answer positions of (max_v z_v − mean_v z_v)², which drives the forget distribution
towards uniform. Lagrangian, minimised over θ:  γ·L_f + λ·(NLL(D_r) − ε).
Dual ascent after each optimizer update, once ``epoch > dual_warmup_epochs``:
λ ← max(0, λ + η·(NLL(D_r) − ε)).

λ is method state (``state`` / ``load_state`` carry it over a checkpoint restore; ``extras`` reports it as
``dual.lambda``). The NLL of the step's retain batch is averaged over the gang before the dual step, so
every rank holds the same λ. ``dual_step_size = 0`` keeps λ fixed at ``dual_init`` (open-unlearning's
``primal_dual = false``: a plain weighted sum). Defaults are the authors' TOFU run; their README says to
set ``retain_loss_eps`` a little above the target's retain NLL.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from methods.base import MethodInputs, UnlearningMethod, answer_positions, nll, register_method, token_mean


@dataclass(frozen=True)
class PDUParams:
    gamma: float = 1.0  # γ: weight of the flattening (forget) loss
    dual_init: float = 100.0  # λ0: initial dual variable (open-unlearning's alpha; TOFU run 100, MUSE 50)
    dual_step_size: float = 5.0  # η: dual ascent step (TOFU run 5, MUSE 1; open-unlearning's YAML 1)
    retain_loss_eps: float = 0.3  # ε: bound on the retain NLL (TOFU run 0.3; pick a little above the target's)
    dual_warmup_epochs: int = 5  # λ stays at λ0 during the first this-many epochs (TOFU run 5)

    def __post_init__(self) -> None:
        for field in ("gamma", "dual_init", "dual_step_size", "retain_loss_eps"):
            if not getattr(self, field) >= 0:
                raise ValueError(f"pdu: {field} must be ≥ 0, got {getattr(self, field)}")
        warmup = self.dual_warmup_epochs
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"pdu: dual_warmup_epochs must be an integer ≥ 0, got {warmup!r}")


@register_method("pdu")
class PDU(UnlearningMethod):
    """Flatten the forget logits while a dual variable keeps the retain NLL under ε."""

    Params: ClassVar[type] = PDUParams
    splits: ClassVar[tuple[str, ...]] = ("forget", "retain")
    # The authors' TOFU run: 10 epochs at lr 1e-5 (up to ~1e-3 for the embedded tiny models). ε depends on the
    # target's retain NLL, so a few values around 0.3; λ0 their TOFU 100 / MUSE 50; η their TOFU 5 / MUSE 1.
    # Warm-up 0 or 2 rather than their 5, so a 5-epoch trial still takes dual steps.
    default_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lr": {"loguniform": [1e-5, 1e-3]},
        "epochs": {"choice": [5, 10]},
        "retain_loss_eps": {"choice": [0.1, 0.3, 0.5]},
        "dual_init": {"choice": [50.0, 100.0]},
        "dual_step_size": {"choice": [1.0, 5.0]},
        "dual_warmup_epochs": {"choice": [0, 2]},
    }

    def __init__(self, params: PDUParams) -> None:
        super().__init__(params)
        self.dual: float = float(params.dual_init)  # λ, a plain float: it is stepped by hand, never by autograd
        self._retain_nll: torch.Tensor | None = None  # detached NLL(D_r) of the last objectives call

    def objectives(self, inputs: MethodInputs) -> dict[str, torch.Tensor]:
        p = self.params
        logits, _, answer = answer_positions(inputs.policy["forget"])  # [batch, seq-1, vocab], [batch, seq-1]
        margin = logits.max(dim=-1).values - logits.mean(dim=-1)  # [batch, seq-1]
        retain_nll = nll(inputs.policy["retain"])
        self._retain_nll = retain_nll.detach()
        return {"forget": p.gamma * token_mean(margin.pow(2), answer),
                "retain": self.dual * (retain_nll - p.retain_loss_eps)}

    def after_step(self, epoch: int, mean_over_ranks: Callable[[torch.Tensor], torch.Tensor]) -> None:
        retain_nll, self._retain_nll = self._retain_nll, None
        # Both conditions are the same on every rank, so every rank joins the collective or none does.
        if retain_nll is None or epoch <= self.params.dual_warmup_epochs:
            return
        mean_nll = mean_over_ranks(retain_nll)
        if not torch.isfinite(mean_nll):  # a diverged step: max(0, nan) would silently reset λ to 0
            return
        violation = float(mean_nll) - self.params.retain_loss_eps
        self.dual = max(0.0, self.dual + self.params.dual_step_size * violation)

    def state(self) -> dict[str, float]:
        return {"dual": self.dual}

    def load_state(self, state: dict[str, float]) -> None:
        if "dual" not in state:
            raise ValueError(f"pdu: state has no 'dual' (the dual variable λ); got keys {sorted(state)}")
        self.dual = float(state["dual"])

    def extras(self) -> dict[str, float]:
        return {"dual.lambda": self.dual}
