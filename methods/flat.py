"""FLAT — forget-data-only loss adjustment (Wang et al., ICLR 2025, arXiv 2410.11143; UCSC-REAL/FLAT).

No retain data, no reference model. With P̄(y|x) the mean over answer tokens of the token PROBABILITY,
a template answer y_e (refusal line) and the forget answer y_f: L = −[g*(P̄_e) − f*(g*(P̄_f))], i.e.

    kl       −P̄_e + exp(P̄_f − 1)                      (headline)
    pearson  −P̄_e + P̄_f + P̄_f²/4
    js       log(1+e^(−P̄_e)) + log(1+e^(P̄_f)) − 2·log 2
    tv       ½·tanh(P̄_f) − ½·tanh(P̄_e)

``averaging = "sample"`` (default, the paper): the terms per example, then the batch mean.
``averaging = "batch"`` (the released code): each P̄ is ONE batch-level number, the mean token probability
over the padded [batch, seq−1] grid with prompt and padding positions counting 0, and g/f* apply to it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from methods.base import (
    MethodInputs,
    ModelOutput,
    UnlearningMethod,
    answer_token_logprobs,
    mean_token_prob,
    register_method,
)

# divergence → (term on the template's P̄_e, term on the forget P̄_f); the loss is their sum. The split
# follows the paper's −g*(P̄_e) and +f*(g*(P̄_f)) so each named objective logs one side of the contrast.
DIVERGENCES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "kl": (lambda e: -e, lambda f: torch.exp(f - 1.0)),
    "pearson": (lambda e: -e, lambda f: f + f * f / 4.0),
    "js": (lambda e: F.softplus(-e) - math.log(2.0), lambda f: F.softplus(f) - math.log(2.0)),
    "tv": (lambda e: -0.5 * torch.tanh(e), lambda f: 0.5 * torch.tanh(f)),
}
AVERAGING = ("sample", "batch")


@dataclass(frozen=True)
class FLATParams:
    divergence: str = "kl"  # one of DIVERGENCES: the f-divergence whose variational form is used
    averaging: str = "sample"  # "sample" (paper) or "batch" (released code), see the module docstring

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"flat: divergence {self.divergence!r} unknown; known: {', '.join(DIVERGENCES)}")
        if self.averaging not in AVERAGING:
            raise ValueError(f"flat: averaging {self.averaging!r} unknown; known: {', '.join(AVERAGING)}")


def batch_mean_token_prob(out: ModelOutput) -> torch.Tensor:
    """The released code's P̄: Σ answer-token probabilities / (batch·(seq−1)) — one scalar per batch."""
    logprobs, mask = answer_token_logprobs(out)  # [batch, seq-1] each
    return (logprobs.exp() * mask).sum() / mask.numel()


@register_method("flat")
class FLAT(UnlearningMethod):
    """Raise the template answer's mean token probability, lower the forget answer's (f-divergence weighted)."""

    Params: ClassVar[type] = FLATParams
    splits: ClassVar[tuple[str, ...]] = ("forget", "template")
    # The released code trains 5 epochs at lr 1e-5 (METHODS.md); the embedded tiny models need up to ~1e-3.
    # KL is the headline divergence; the paper reports all four.
    default_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lr": {"loguniform": [1e-5, 1e-3]},
        "epochs": {"choice": [5, 10]},
        "divergence": {"choice": ["kl", "js", "pearson", "tv"]},
    }

    def objectives(self, inputs: MethodInputs) -> dict[str, torch.Tensor]:
        template_term, forget_term = DIVERGENCES[self.params.divergence]
        average = mean_token_prob if self.params.averaging == "sample" else batch_mean_token_prob
        p_template = average(inputs.policy["template"])  # [batch] or scalar
        p_forget = average(inputs.policy["forget"])
        return {"template": template_term(p_template).mean(), "forget": forget_term(p_forget).mean()}
