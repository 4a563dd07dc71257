"""How measured metrics become the numbers searches and rankings compare: one rule each.

- log10 of forget quality: FQ is a KS-test p-value, which underflows to 0 in float64 for very different
  samples; it counts as ``FQ_FLOOR`` (log10 = −300), so Tune, the dashboards and the ranking all see the
  same finite number. A forget quality that was not measured stays None, never a stand-in.
- the forget axis per benchmark kind: log10 FQ (TOFU, higher is better) or −VerbMem (MUSE, which has no
  truth ratios; VerbMem is ROUGE-L F1 in [0, 1], lower is better).
- the sweep's scalar score: forget axis − utility_weight · max(0, utility loss).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

FQ_FLOOR = 1e-300
KINDS = ("tofu", "muse")


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def log10_forget_quality(forget_quality: Any) -> float | None:
    """log10 of a p-value, an underflowed one counted as FQ_FLOOR; None when missing, NaN or negative."""
    fq = _finite(forget_quality)
    if fq is None or fq < 0:
        return None
    return math.log10(max(fq, FQ_FLOOR))


def forget_score(metrics: Mapping[str, Any], kind: str) -> float | None:
    """The forget axis, higher is better: log10 FQ (TOFU) or −VerbMem (MUSE); None when not measured."""
    if kind not in KINDS:
        raise ValueError(f"benchmark kind {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "muse":
        verbmem = _finite(metrics.get("verbmem_forget"))
        return None if verbmem is None else -verbmem
    return log10_forget_quality(metrics.get("forget_quality"))


def score(metrics: Mapping[str, Any], utility_weight: float, kind: str = "tofu") -> float | None:
    """What a single-objective search maximises; None when either axis was not measured."""
    forget, loss = forget_score(metrics, kind), _finite(metrics.get("utility_loss"))
    if forget is None or loss is None:
        return None
    return forget - utility_weight * max(0.0, loss)
