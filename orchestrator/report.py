"""The comparison report: Markdown, a self-contained HTML page and PNG plots.

Presentation only: the ranking itself is decided in ``compare.py``; this module turns its tables into
cells, text and pictures. Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so no
display and no global figure state are involved.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from orchestrator.probe_view import probe_table
from orchestrator.results import forget_axis
from orchestrator.scores import FQ_FLOOR

SCATTER_FILE = "fq_vs_utility_loss.png"
CURVES_FILE = "learning_curves.png"
PROBES_FILE = "robustness.png"
MARKDOWN_FILE = "report.md"
HTML_FILE = "report.html"
# One per results.REFERENCE_METHODS (a test keeps the two in step).
_REFERENCE_STYLE = {"target": dict(marker="*", color="black", s=180), "retain": dict(marker="D", color="tab:gray", s=70),
                    "base": dict(marker="P", color="tab:brown", s=90)}
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "h", "p", "*")

HOW_TO_READ = (
    "**Forget quality (FQ)** is the KS-test p-value between the forget-set truth ratios of the unlearned model and "
    "of the retain model (never trained on the forget set). Higher is better; compare orders of magnitude (the "
    "ranking uses log10 FQ). The retain model scores 1 by construction.",
    "**Utility loss** is `1 - MU / MU_target`: 0 means no damage to model utility, 0.1 means 10 % lost, negative "
    "means utility improved.",
    "Each trial is represented by its **best epoch** with utility loss at or below the ceiling (highest FQ; ties go "
    "to lower utility loss, then the earlier epoch; epoch 0, the untouched target, is not a candidate). A trial that "
    "never got under the ceiling shows its least-damaging epoch, marked `*`, and ranks after every trial that did. "
    "Trials without measured metrics (diverged, failed) rank last.",
    "**Front 0** is the Pareto front: no other trial has both higher FQ and lower utility loss. Within a front, "
    "higher FQ ranks first, then lower cost (worker-seconds = (train + eval seconds) x workers, summed over the "
    "trial's evaluations). The method ranking takes each method's best trial.",
    "`target` (before unlearning), `retain` and, when the run fine-tuned a pretrained model, `base` (that model "
    "before fine-tuning) rows are reference points, marked `ref`, never ranked.",
)


# ---------------------------------------------------------------------------------------------
# Cells shared by the terminal, Markdown and HTML tables


def _number(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else format(value, spec)


def compact_params(params: str | None) -> str:
    """Hyperparameter JSON without spaces and with floats cut to 4 significant digits."""
    if not params:
        return "-"
    try:
        values = json.loads(params)
    except json.JSONDecodeError:
        return params  # not ours to repair: show it as it is
    if not isinstance(values, dict):
        return params
    short = {k: float(format(v, ".4g")) if isinstance(v, float) else v for k, v in values.items()}
    return json.dumps(short, sort_keys=True, separators=(",", ":"))


def _rank_cell(row: dict[str, Any]) -> str:
    if row.get("reference"):
        return "ref"
    return f"{row['rank']}*" if row.get("over_ceiling") else str(row["rank"])


@dataclass(frozen=True)
class _ForgetMetric:
    """How a run's forgetting is shown, per forget axis (scores.forget_axis): FQ, VerbMem (MUSE) or the
    forget-answer probability (TOFU without a retain model), in the tables (with a companion column) and
    on the figures' forget axis."""

    column: str
    header: str
    fmt: str
    companion: tuple[str, str]  # (column, header) of the table's second forget number, formatted .3f
    label: str  # the figures' axis label
    short: str
    log: bool  # FQ spans orders of magnitude; VerbMem is a fraction


_FORGET_METRICS = {
    "forget_quality": _ForgetMetric("forget_quality", "FQ", ".2e", ("forget_rouge", "forget ROUGE"),
                          "forget quality  (KS p-value, higher is better)", "forget quality", True),
    # MUSE has no FQ or forget ROUGE: VerbMem and KnowMem on forget questions take their place.
    "verbmem": _ForgetMetric("verbmem_forget", "VerbMem", ".3f", ("knowmem_forget", "KnowMem forget"),
                             "VerbMem on the forget set  (ROUGE-L F1, lower is better)", "VerbMem", False),
    # No retain model, so no FQ: what is measured of the forgetting is the forget answers' probability.
    "forget_prob": _ForgetMetric("forget_prob", "forget prob", ".3f", ("forget_rouge", "forget ROUGE"),
                                 "forget-answer probability  (no retain model: lower is better)", "forget prob",
                                 False),
}


def _forget_metric(table: pa.Table) -> _ForgetMetric:
    return _FORGET_METRICS[forget_axis(table)]


def table_cells(ranked: pa.Table) -> tuple[list[str], list[list[str]]]:
    """Headers and string cells of a ranking table (trials or methods), reference rows marked ``ref``."""
    rows = ranked.to_pylist()
    show_runs = len({row["run_id"] for row in rows}) > 1
    show_trials = "trials" in ranked.column_names
    metric = _forget_metric(ranked)
    headers = ["rank", "front"] + (["trials"] if show_trials else []) + (["run"] if show_runs else [])
    probed = any(row.get("worst_probe") for row in rows)
    headers += ["method", "params", "epoch", metric.header, "MU", "util loss", metric.companion[1], "privleak",
                "worker-s", "status"] + ([f"{metric.header} after worst probe"] if probed else [])
    cells = []
    for row in rows:
        line = [_rank_cell(row), "-" if row["front"] is None else str(row["front"])]
        line += ([_number(row["trials"], "d")] if show_trials else []) + ([str(row["run_id"])] if show_runs else [])
        line += [
            str(row["method"]),
            "-" if row.get("reference") else compact_params(row.get("params")),
            f"{row['epoch']}/{row['epochs_evaluated']}",
            _number(row.get(metric.column), metric.fmt),
            _number(row.get("model_utility"), ".3f"),
            _number(row.get("utility_loss"), ".3f"),
            _number(row.get(metric.companion[0]), ".3f"),
            _number(row.get("privleak"), ".1f"),
            _number(row.get("worker_seconds"), ".1f"),
            str(row.get("status")),
        ] + ([f"{_number(row.get(f'probe_{metric.column}'), metric.fmt)} ({row['worst_probe']})"
              if row.get("worst_probe") else "-"] if probed else [])
        cells.append(line)
    return headers, cells


def table_notes(ranked: pa.Table) -> list[str]:
    rows = ranked.to_pylist()
    notes = ["epoch: chosen epoch / epochs evaluated"]
    if any(row.get("over_ceiling") for row in rows):
        notes.append("*: no epoch within the utility-loss ceiling; the least-damaging epoch is shown")
    if any(row.get("reference") for row in rows):
        notes.append("ref: reference model (target = before unlearning, retain = never saw the forget set, "
                     "base = the pretrained model before fine-tuning), not ranked")
    return notes


def markdown_table(ranked: pa.Table) -> str:
    headers, cells = table_cells(ranked)
    escape = lambda cell: cell.replace("|", "\\|")  # noqa: E731 — a pipe would split the cell
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(escape(c) for c in line) + " |" for line in cells]
    return "\n".join(lines)


def html_table(ranked: pa.Table) -> str:
    headers, cells = table_cells(ranked)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        f"<tr class=\"{'ref' if cell_row[0] == 'ref' else ''}\">" + "".join(f"<td>{html.escape(c)}</td>" for c in cell_row) + "</tr>"
        for cell_row in cells
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ---------------------------------------------------------------------------------------------
# Plots


def _method_styles(methods: list[str]) -> dict[str, dict[str, Any]]:
    """A fixed colour and marker per method (sorted by name) shared by both figures."""
    colours = [f"C{i}" for i in range(10)]
    return {m: dict(color=colours[i % 10], marker=_MARKERS[i % len(_MARKERS)]) for i, m in enumerate(sorted(methods))}


def _fq_floor(values: list[float]) -> float:
    """Where FQ = 0 (an underflowed p-value) is drawn on the log axis: a decade below the smallest positive."""
    positive = [v for v in values if v > 0]
    return min(positive) / 10 if positive else FQ_FLOOR


def _measured(row: dict[str, Any], column: str) -> bool:
    forget, loss = row.get(column), row.get("utility_loss")
    return forget is not None and loss is not None and not math.isnan(forget) and not math.isnan(loss)


def plot_fq_vs_utility_loss(ranked: pa.Table, utility_ceiling: float, path: str | os.PathLike) -> Path:
    """Scatter of each trial's best epoch (x utility loss, y FQ on a log axis, or VerbMem for MUSE runs)
    with the Pareto front."""
    metric = _forget_metric(ranked)
    rows = [row for row in ranked.to_pylist() if _measured(row, metric.column)]
    trials = [row for row in rows if not row["reference"]]
    floor = _fq_floor([row[metric.column] for row in rows]) if metric.log else -math.inf
    fq = lambda row: max(row[metric.column], floor)  # noqa: E731
    fig = Figure(figsize=(8, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method, style in _method_styles(list({row["method"] for row in trials})).items():
        for over, fill in ((False, style["color"]), (True, "none")):
            points = [row for row in trials if row["method"] == method and bool(row["over_ceiling"]) == over]
            if points:
                ax.scatter([r["utility_loss"] for r in points], [fq(r) for r in points], marker=style["marker"],
                           facecolors=fill, edgecolors=style["color"], label=method if not over else f"{method} (over ceiling)")
    # The attainment staircase: with utility loss ≤ x, the best FQ reachable is the front point left of x.
    front = sorted((row for row in trials if row["front"] == 0), key=lambda r: (r["utility_loss"], fq(r)))
    if front:
        ax.step([r["utility_loss"] for r in front], [fq(r) for r in front], where="post", color="black", lw=1, label="Pareto front")
    for row in (r for r in rows if r["reference"]):
        style = _REFERENCE_STYLE.get(row["method"], dict(marker="x", color="black", s=60))
        ax.scatter([row["utility_loss"]], [fq(row)], zorder=3, **style)
        ax.annotate(row["method"], (row["utility_loss"], fq(row)), textcoords="offset points", xytext=(6, 6))
    ax.axvline(utility_ceiling, ls="--", color="tab:red", lw=1, label=f"utility-loss ceiling {utility_ceiling:g}")
    if rows and metric.log:
        ax.set_yscale("log")
    elif not rows:
        ax.text(0.5, 0.5, f"no trial with measured {metric.short} and utility loss", transform=ax.transAxes, ha="center")
    ax.set_xlabel("utility loss  (1 - MU / MU_target, lower is better)")
    ax.set_ylabel(metric.label)
    ax.set_title(f"{metric.short[0].upper()}{metric.short[1:]} vs utility loss (best epoch per trial)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return _save(fig, path)


def _curves_by_trial(evals: pa.Table, method: str) -> dict[tuple[str, str], list[dict[str, Any]]]:
    curves: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in evals.to_pylist():
        if row["method"] == method:
            curves.setdefault((row["run_id"], row["trial_id"]), []).append(row)
    return {key: sorted(rows, key=lambda r: r["epoch"]) for key, rows in sorted(curves.items(), key=lambda kv: str(kv[0]))}


def _nan_for_none(value: Any) -> float:
    return math.nan if value is None else float(value)


def plot_learning_curves(evals: pa.Table, path: str | os.PathLike) -> Path:
    """Per method one row of two subplots, FQ (log; VerbMem for MUSE runs) and MU over epochs, one line
    per trial."""
    metric = _forget_metric(evals)
    references = {row["method"]: row for row in evals.to_pylist() if row["method"] in _REFERENCE_STYLE}
    methods = sorted({m for m in evals.column("method").to_pylist() if m not in _REFERENCE_STYLE})
    fig = Figure(figsize=(10, 2.6 * max(len(methods), 1)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(len(methods), 1), 2, squeeze=False)
    styles = _method_styles(methods)
    measured = [v for v in evals.column(metric.column).to_pylist() if v is not None and not math.isnan(v)]
    floor = _fq_floor(measured) if metric.log else -math.inf
    for (ax_fq, ax_mu), method in zip(axes, methods):
        curves = _curves_by_trial(evals, method)
        for (run_id, trial_id), rows in curves.items():
            label = str(trial_id) if len(curves) <= 8 else None  # a legend of dozens of trials helps no one
            epochs = [r["epoch"] for r in rows]
            fq = [max(_nan_for_none(r[metric.column]), floor) for r in rows]  # max(nan, x) keeps nan
            ax_fq.plot(epochs, fq, marker=styles[method]["marker"], ms=3, lw=1, label=label)
            ax_mu.plot(epochs, [_nan_for_none(r["model_utility"]) for r in rows], marker=styles[method]["marker"], ms=3, lw=1)
        _draw_reference_levels(ax_fq, ax_mu, references, metric)
        if metric.log and any(v > 0 for line in ax_fq.get_lines() for v in line.get_ydata() if not math.isnan(v)):
            ax_fq.set_yscale("log")
        ax_fq.set_title(f"{method}: {metric.short}", fontsize=9)
        ax_mu.set_title(f"{method}: model utility", fontsize=9)
        for ax in (ax_fq, ax_mu):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch", fontsize=8)
            ax.grid(True, alpha=0.3)
        if any(line.get_label() and not line.get_label().startswith("_") for line in ax_fq.get_lines()):
            ax_fq.legend(fontsize=6)
    if not methods:
        axes[0][0].text(0.5, 0.5, "no trials", transform=axes[0][0].transAxes, ha="center")
    fig.tight_layout()
    return _save(fig, path)


def _draw_reference_levels(ax_fq: Any, ax_mu: Any, references: dict[str, dict[str, Any]], metric: _ForgetMetric) -> None:
    """Horizontal lines at the reference models' values (target and retain: the two ends of the trade-off)."""
    for method, row in references.items():
        colour = _REFERENCE_STYLE[method]["color"]
        for ax, column in ((ax_fq, metric.column), (ax_mu, "model_utility")):
            value = row.get(column)
            if value is not None and not math.isnan(value) and (column != metric.column or not metric.log or value > 0):
                ax.axhline(value, color=colour, ls=":", lw=1, label=f"{method}")


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)  # a reader never sees half a PNG
    return path


# ---------------------------------------------------------------------------------------------
# Documents


def markdown_report(*, ranked: pa.Table, methods: pa.Table, run_ids: list[str], warnings: list[str], utility_ceiling: float,
                    probes: Path | None = None, probe_table: str | None = None) -> str:
    parts = [
        "# Unlearning comparison",
        f"Runs: {', '.join(f'`{r}`' for r in run_ids)}  \nUtility-loss ceiling: {utility_ceiling:g}",
    ]
    if warnings:
        parts.append("## Warnings\n" + "\n".join(f"- {w}" for w in warnings))
    parts += [
        "## Methods\n" + markdown_table(methods) + "\n\n" + "\n".join(f"- {n}" for n in table_notes(methods)),
        "## Trials\n" + markdown_table(ranked) + "\n\n" + "\n".join(f"- {n}" for n in table_notes(ranked)),
        f"## Forget quality vs utility loss\n![forget quality vs utility loss]({SCATTER_FILE})",
        f"## Learning curves\n![learning curves]({CURVES_FILE})",
        *([f"## Robustness probes\n{probe_table}\n\n![before vs after each probe]({PROBES_FILE})"] if probes else []),
        "## How to read this\n" + "\n".join(f"- {item}" for item in HOW_TO_READ),
    ]
    return "\n\n".join(parts) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;white-space:nowrap}th{background:#f0f0f0}
tr.ref{background:#f7f7e8;font-style:italic}img{max-width:100%}.warn{color:#a00}"""


def _inline_markdown_to_html(text: str) -> str:
    """The two inline marks HOW_TO_READ uses: **bold** and `code`."""
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def html_report(
    *, ranked: pa.Table, methods: pa.Table, run_ids: list[str], warnings: list[str], utility_ceiling: float,
    scatter: Path, curves: Path, probes: Path | None = None,
) -> str:
    """One HTML file with the PNGs embedded as base64, so it can be mailed or archived alone."""
    notes = lambda table: "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in table_notes(table)) + "</ul>"  # noqa: E731
    how = "".join(f"<li>{_inline_markdown_to_html(item)}</li>" for item in HOW_TO_READ)
    body = [
        "<h1>Unlearning comparison</h1>",
        f"<p>Runs: {html.escape(', '.join(run_ids))}<br>Utility-loss ceiling: {utility_ceiling:g}</p>",
    ]
    if warnings:
        body.append("<h2>Warnings</h2><ul class=\"warn\">" + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul>")
    body += [
        "<h2>Methods</h2>" + html_table(methods) + notes(methods),
        "<h2>Trials</h2>" + html_table(ranked) + notes(ranked),
        f"<h2>Forget quality vs utility loss</h2><img alt=\"forget quality vs utility loss\" src=\"{_png_data_uri(scatter)}\">",
        f"<h2>Learning curves</h2><img alt=\"learning curves\" src=\"{_png_data_uri(curves)}\">",
        *([f"<h2>Robustness probes</h2><img alt=\"before vs after each probe\" src=\"{_png_data_uri(probes)}\">"]
          if probes else []),
        f"<h2>How to read this</h2><ul>{how}</ul>",
    ]
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Unlearning comparison</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")


def _write_text(text: str, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def plot_probes(evals: pa.Table, ranked: pa.Table, path: str | os.PathLike) -> Path | None:
    """Forget-answer probability of each probed trial's chosen epoch before and after each probe (None when
    no trial was probed)."""
    rows = evals.to_pylist()
    trials = [r for r in ranked.to_pylist() if r.get("worst_probe")]
    if not trials:
        return None
    probes = sorted({r["probe"] for r in rows if r.get("probe")})
    fig = Figure(figsize=(max(6.0, 0.9 * len(trials) + 2), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / (len(probes) + 1)
    for offset, label in enumerate(["before", *probes]):
        values = []
        for trial in trials:
            if label == "before":
                values.append(_nan_for_none(trial.get("forget_prob")))
                continue
            match = [r for r in rows if r.get("probe") == label and (r["run_id"], r["trial_id"], r["epoch"])
                     == (trial["run_id"], trial["trial_id"], trial["epoch"])]
            values.append(_nan_for_none(match[0].get("forget_prob")) if match else math.nan)
        ax.bar([i + offset * width for i in range(len(trials))], values, width, label=label)
    ax.set_xticks([i + width * len(probes) / 2 for i in range(len(trials))],
                  [f"{t['method']}\n{t['trial_id'][-5:]}" for t in trials], fontsize=8)
    ax.set_ylabel("forget-answer probability")
    ax.set_title("Does the forgetting survive? Before vs after each probe")
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_report(
    out_dir: str | os.PathLike, *, evals: pa.Table, ranked: pa.Table, methods: pa.Table,
    run_ids: list[str], warnings: list[str], utility_ceiling: float,
) -> dict[str, Path]:
    """Write the two PNGs, ``report.md`` and ``report.html`` into ``out_dir``; return their paths by kind."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scatter = plot_fq_vs_utility_loss(ranked, utility_ceiling, out_dir / SCATTER_FILE)
    curves = plot_learning_curves(evals, out_dir / CURVES_FILE)
    probes = plot_probes(evals, ranked, out_dir / PROBES_FILE)
    shared = dict(ranked=ranked, methods=methods, run_ids=run_ids, warnings=warnings, utility_ceiling=utility_ceiling,
                  probes=probes)
    markdown = _write_text(markdown_report(**shared, probe_table=probe_table(evals.to_pylist(), ranked.to_pylist())),
                           out_dir / MARKDOWN_FILE)
    page = _write_text(html_report(**shared, scatter=scatter, curves=curves), out_dir / HTML_FILE)
    return {"markdown": markdown, "html": page, "scatter": scatter, "curves": curves} | ({"probes": probes} if probes else {})
