"""The robustness view of a comparison: each trial's metrics after its worst probe.

A probe row (``probe`` = relearn / int8 / int4) attacks the epoch a trial is represented by. The worst probe
is the one that restores the most forgetting: the lowest forget score on the run's forget axis
(``scores.forget_score``). Ranking on it puts a method whose forgetting does not survive below one whose
forgetting does; a trial without probe rows is then unmeasured, ranked after every probed one.
"""
from __future__ import annotations

import math
from typing import Any

import pyarrow as pa

from orchestrator.scores import forget_score

PROBE_FIELDS = (
    pa.field("worst_probe", pa.string()),  # which probe restored the most, None when none ran
    pa.field("probe_forget_score", pa.float64()),  # the forget axis after it (null: not probed)
    pa.field("probe_forget_quality", pa.float64()),
    pa.field("probe_forget_prob", pa.float64()),
)


def split_probe_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[tuple, list[dict[str, Any]]]]:
    """(the trials' own rows, probe rows by (run_id, trial_id, epoch))."""
    own, probes = [], {}
    for row in rows:
        if row.get("probe"):
            probes.setdefault((row["run_id"], row["trial_id"], row["epoch"]), []).append(row)
        else:
            own.append(row)
    return own, probes


def worst_probe(summary: dict[str, Any], probes: dict[tuple, list[dict[str, Any]]], axis: str) -> dict[str, Any]:
    """The PROBE_FIELDS of one trial summary (its chosen epoch's probes)."""
    attacked = [(score, row) for row in probes.get((summary["run_id"], summary["trial_id"], summary["epoch"]), [])
                if (score := forget_score(row, axis)) is not None]
    if not attacked:
        return {"worst_probe": None, "probe_forget_score": None, "probe_forget_quality": None,
                "probe_forget_prob": None}
    score, row = min(attacked, key=lambda item: (item[0], item[1]["probe"]))
    return {"worst_probe": row["probe"], "probe_forget_score": score, "probe_forget_quality": row.get("forget_quality"),
            "probe_forget_prob": row.get("forget_prob")}


def probed_forget(row: dict[str, Any]) -> float:
    """The forget axis a robust ranking uses: the value after the worst probe (NaN when not probed)."""
    value = row.get("probe_forget_score")
    return math.nan if value is None else float(value)


def probe_rows(evals_rows: list[dict[str, Any]], trial: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The probe rows of one trial summary's chosen epoch, by probe."""
    key = (trial["run_id"], trial["trial_id"], trial["epoch"])
    return {r["probe"]: r for r in evals_rows if r.get("probe") and (r["run_id"], r["trial_id"], r["epoch"]) == key}


def probe_table(evals_rows: list[dict[str, Any]], trials: list[dict[str, Any]]) -> str | None:
    """Markdown: each probed trial's forget quality and forget-answer probability at its chosen epoch, before
    and after each probe (None when no trial was probed). A cell the probe did not measure shows '-'."""
    probed = [(trial, probe_rows(evals_rows, trial)) for trial in trials]
    probed = [(trial, rows) for trial, rows in probed if rows]
    if not probed:
        return None
    names = sorted({name for _, rows in probed for name in rows})
    cell = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
    header = ["method", "params", "epoch", "FQ", "forget prob"]
    header += [f"{label} {name}" for name in names for label in ("FQ", "forget prob")] + ["worst probe"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for trial, rows in probed:
        cells = [trial["method"], trial.get("params") or "-", str(trial["epoch"]),
                 cell(trial.get("forget_quality"), ".3g"), cell(trial.get("forget_prob"), ".3f")]
        for name in names:
            row = rows.get(name, {})
            cells += [cell(row.get("forget_quality"), ".3g"), cell(row.get("forget_prob"), ".3f")]
        lines.append("| " + " | ".join(cells + [trial.get("worst_probe") or "-"]) + " |")
    return "\n".join(lines)
