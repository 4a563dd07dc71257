"""What an evaluation is configured with, and the context every scoring step shares."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.encoding import pad_id
from orchestrator.evaluation.scorer import Scorer

MIA_ATTACKS = ("loss", "zlib", "mink", "minkpp")  # scores of one teacher-forced pass (teacher_forced.py)
# How per-example truth values are formed and averaged: "ratio" is TOFU's P_wrong/P_correct (forget:
# mean min(TR, 1/TR), others: mean max(0, 1 − TR)); "prob_mean" is P_c/(P_c + P_w), averaged (open-unlearning
# #163). Forget quality's KS test compares the per-example values, so the aggregator changes it too.
TRUTH_RATIO_AGGREGATORS = ("ratio", "prob_mean")


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 16  # examples per forward (each brings 2 + k sequences) and prompts per generate call
    max_new_tokens: int = 200  # greedy tokens for TOFU's ROUGE
    max_length: int = 512  # prompt + answer tokens of a teacher-forced sequence (the reference's 512)
    template: str = "qa"  # templates.PROMPT_TEMPLATES name or a format string with {question}
    mink_k: float = 0.4  # fraction of lowest tokens for Min-k% and Min-k%++
    retain_eval_size: int | None = None  # cap on retain examples; None: all of retain_perturbed if present, else as many as the forget split has
    verbmem_prefix_tokens: int = 32  # VerbMem without MUSE's verbmem_forget set: prompt = a forget text's first tokens
    verbmem_new_tokens: int = 128  # VerbMem continuation length (the fallback compares as many true tokens)
    knowmem_new_tokens: int = 32  # MUSE KnowMem answer length
    privleak_attack: str = "mink"  # which MIA's AUC privleak compares (the reference uses Min-k%)
    generation: bool = True  # False: skip every generation metric (ROUGE, model utility, MUSE)
    utility_sets: bool = True  # False: skip real authors / world facts (no TOFU model utility)
    truth_ratio_aggregator: str = "ratio"  # TRUTH_RATIO_AGGREGATORS
    # GradNorm MIA: one forward + backward per forget/holdout example; off where weights cannot be had whole
    # (ZeRO-3 with gather_weights off)
    gradnorm: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens", "max_length", "verbmem_prefix_tokens",
                     "verbmem_new_tokens", "knowmem_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"evaluation.{name} must be ≥ 1, got {getattr(self, name)}")
        if not 0 < self.mink_k <= 1:
            raise ValueError(f"evaluation.mink_k must be in (0, 1], got {self.mink_k}")
        if self.retain_eval_size is not None and self.retain_eval_size < 1:
            raise ValueError(f"evaluation.retain_eval_size must be ≥ 1 or None, got {self.retain_eval_size}")
        if self.truth_ratio_aggregator not in TRUTH_RATIO_AGGREGATORS:
            raise ValueError(f"evaluation.truth_ratio_aggregator must be one of {TRUTH_RATIO_AGGREGATORS}, "
                             f"got {self.truth_ratio_aggregator!r}")
        if self.privleak_attack not in MIA_ATTACKS:
            raise ValueError(f"evaluation.privleak_attack must be one of {MIA_ATTACKS}, got {self.privleak_attack!r}")


@dataclass
class EvalContext:
    scorer: Scorer
    tokenizer: Any
    config: EvalConfig
    device: torch.device
    synced: bool
    rows_per_forward: int | None  # None: all sequences of a batch in one forward (per-sample mode: 1)

    @property
    def pad(self) -> int:
        return pad_id(self.tokenizer)


def eval_config(config: dict[str, Any]) -> EvalConfig:
    """The EvalConfig of a worker config (its ``evaluation`` section and the prompt template)."""
    options = {k: v for k, v in config["evaluation"].items() if k not in ("every", "gather_weights")}
    return EvalConfig(template=config["model"]["prompt_template"], **options)
