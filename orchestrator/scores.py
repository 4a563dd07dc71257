"""How measured metrics become the numbers searches and rankings compare: one rule each.

- log10 of forget quality: FQ is a KS-test p-value, which underflows to 0 in float64 for very different
  samples; it counts as ``FQ_FLOOR`` (log10 = −300), so Tune, the dashboards and the ranking all see the
  same finite number. A forget quality that was not measured stays None, never a stand-in.
- the forget axis, higher is better, chosen per run by ``forget_axis``: log10 FQ where a retain model gives
  forget quality (TOFU); −VerbMem on MUSE (no truth ratios; ROUGE-L F1 in [0, 1]); −forget probability on
  TOFU data without a retain model (the forgetting that can still be measured).
- the sweep's scalar score: forget axis − utility_weight · max(0, utility loss).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

FQ_FLOOR = 1e-300
KINDS = ("tofu", "muse")
# axis name → the metric it reads and the sign that makes higher better
AXES: dict[str, tuple[str, float]] = {
    "forget_quality": ("forget_quality", 1.0),  # log10 of it
    "verbmem": ("verbmem_forget", -1.0),
    "forget_prob": ("forget_prob", -1.0),
}


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


def forget_axis(kind: str, has_forget_quality: bool) -> str:
    """Which forget axis a run is compared on: its benchmark kind and whether it measures forget quality."""
    if kind not in KINDS:
        raise ValueError(f"benchmark kind {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "muse":
        return "verbmem"
    return "forget_quality" if has_forget_quality else "forget_prob"


def forget_score(metrics: Mapping[str, Any], axis: str) -> float | None:
    """The forget axis's value for one row, higher is better; None when not measured."""
    if axis not in AXES:
        raise ValueError(f"forget axis {axis!r}: expected one of {', '.join(AXES)}")
    metric, sign = AXES[axis]
    if axis == "forget_quality":
        return log10_forget_quality(metrics.get(metric))
    value = _finite(metrics.get(metric))
    return None if value is None else sign * value


def score(metrics: Mapping[str, Any], utility_weight: float, axis: str = "forget_quality") -> float | None:
    """What a single-objective search maximises; None when either axis was not measured."""
    forget, loss = forget_score(metrics, axis), _finite(metrics.get("utility_loss"))
    if forget is None or loss is None:
        return None
    return forget - utility_weight * max(0.0, loss)


def choose_row(rows: list[Mapping[str, Any]], utility_ceiling: float, axis: str) -> tuple[Mapping[str, Any], bool]:
    """The evaluation that represents a trial, and whether it lies over the utility-loss ceiling: the best
    forget score among epochs with utility loss ≤ ceiling (ties: lower utility loss, then earlier epoch);
    without one, the epoch that damaged utility least; without any measured epoch, the last row. Epoch 0
    (the untouched target) counts only when the trial has nothing else. The ranking and the robustness
    probes (which attack this epoch) share this rule."""
    candidates = [row for row in rows if row["epoch"] >= 1] or list(rows)
    measured = [(row, forget, loss) for row in candidates
                if (forget := forget_score(row, axis)) is not None and (loss := _finite(row.get("utility_loss"))) is not None]
    within = [item for item in measured if item[2] <= utility_ceiling]
    if within:
        return min(within, key=lambda item: (-item[1], item[2], item[0]["epoch"]))[0], False
    if measured:
        return min(measured, key=lambda item: (item[2], -item[1], item[0]["epoch"]))[0], True
    return rows[-1], False
