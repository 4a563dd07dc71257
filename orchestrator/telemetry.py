"""Live trial metrics through Ray's metrics system, for Grafana and the Ray dashboard.

Rank 0 of each trial's gang records once per epoch: the training loss of every objective, MOLLM's
objective weights, throughput, step and epoch, and — when an evaluation finished — forget quality, model
utility, utility loss and evaluation time. The Tune driver records how many trials are in each state
(``orchestrator/tracking.py``). Each node's Ray metrics agent serves them on its Prometheus endpoint under
Ray 2.60's exported names: a ``ray_`` prefix, and ``_total`` after a counter (``exported_names``). Ray adds
the labels SessionName, NodeAddress, WorkerId, Component and Version; the dashboard aggregates them away.

Ray 2.60's agent drops a gauge series about two report intervals (20 s by default) after the process last
set it, whether or not the process lives on, and an epoch lasts longer than that: ``LiveGauges`` sets each
gauge's latest value again every second until the process exits. No histogram: Ray exports a histogram's
sum from bucket midpoints, so evaluation time is an exact gauge instead.

``METRICS`` is the one list of what exists: the docs table (``metrics_markdown``) and the Grafana
dashboard (``grafana_dashboard``, checked in as docs/grafana/unlearn_dashboard.json) are generated from it:
``python -m orchestrator.telemetry grafana > docs/grafana/unlearn_dashboard.json``.
Outside Ray (torchrun, unit tests) recording does nothing.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, NamedTuple

from orchestrator.scores import log10_forget_quality

logger = logging.getLogger(__name__)

EXPORT_PREFIX = "ray_"  # Ray's Prometheus exporter puts its namespace before every custom metric
TRIAL_TAGS = ("run_id", "trial_id", "method")
TRIAL_STATUSES = ("pending", "running", "paused", "terminated", "error")  # Tune's, lower-cased
REFRESH_SECONDS = 1.0  # under the agent's shortest gauge lifetime (2 s, at a 1 s report interval)


@dataclass(frozen=True)
class MetricInfo:
    kind: Literal["gauge", "counter"]
    description: str
    tag_keys: tuple[str, ...]
    unit: str = "none"  # Grafana's unit for the panel


METRICS: dict[str, MetricInfo] = {
    "unlearn_train_loss": MetricInfo(
        "gauge", "Mean training loss of each objective over the last epoch (objectives are minimised).",
        TRIAL_TAGS + ("objective",)),
    "unlearn_objective_weight": MetricInfo(
        "gauge", "MOLLM/MGDA weight of each objective in the common descent direction, mean over the last epoch: "
                 "weight=lambda the min-norm coefficients, weight=effective lambda times the gradient rescaling when "
                 "gradients are normalised.",
        TRIAL_TAGS + ("objective", "weight")),
    "unlearn_method_state": MetricInfo(
        "gauge", "A method's own per-epoch numbers (its extra.* columns), e.g. PDU's dual variable "
                 "(name=dual.lambda), at the end of the last epoch.",
        TRIAL_TAGS + ("name",)),
    "unlearn_tokens_per_second": MetricInfo(
        "gauge", "Training throughput of the whole gang over the last epoch (non-padding tokens per second).",
        TRIAL_TAGS, "short"),
    "unlearn_tokens": MetricInfo(
        "counter", "Non-padding training tokens processed by the whole gang.", TRIAL_TAGS, "short"),
    "unlearn_step": MetricInfo("gauge", "Optimizer steps taken so far.", TRIAL_TAGS),
    "unlearn_epoch": MetricInfo("gauge", "Last finished epoch.", TRIAL_TAGS),
    "unlearn_forget_quality_log10": MetricInfo(
        "gauge", "log10 of forget quality (KS-test p-value vs the retain model; 0 is best) at the last evaluation.",
        TRIAL_TAGS),
    "unlearn_model_utility": MetricInfo("gauge", "Model utility (harmonic mean) at the last evaluation.", TRIAL_TAGS),
    "unlearn_utility_loss": MetricInfo(
        "gauge", "Relative utility loss vs the target model at the last evaluation (lower is better).",
        TRIAL_TAGS, "percentunit"),
    "unlearn_eval_seconds": MetricInfo(
        "gauge", "Seconds the last evaluation took (sharded over the gang).", TRIAL_TAGS, "s"),
    "unlearn_trials": MetricInfo(
        "gauge", "Trials of the sweep in each Tune state (pending, running, paused, terminated, error).",
        ("run_id", "status")),
}


def exported_names(name: str) -> tuple[str, ...]:
    """The Prometheus series Ray 2.60 serves for a metric (OpenTelemetry exporter)."""
    base = EXPORT_PREFIX + name
    return (f"{base}_total",) if METRICS[name].kind == "counter" else (base,)


# ---------------------------------------------------------------- what an epoch records (pure)
class Sample(NamedTuple):
    metric: str
    value: float
    tags: dict[str, str]  # beyond the trial's own tags


def epoch_samples(stats: Any, row: dict[str, Any]) -> list[Sample]:
    """An epoch's samples from the worker's ``EpochStats`` and evals row. Evaluation metrics only when this
    epoch evaluated: a diverged row carries the previous evaluation's values, which were recorded then."""
    samples = [Sample("unlearn_train_loss", v, {"objective": k}) for k, v in stats.losses.items()]
    samples += [_weight_sample(name, value) for name, value in stats.weights.items()]
    samples += [Sample("unlearn_method_state", value, {"name": name}) for name, value in stats.extras.items()]
    if stats.seconds > 0:
        samples.append(Sample("unlearn_tokens_per_second", stats.tokens / stats.seconds, {}))
    if stats.tokens > 0:
        samples.append(Sample("unlearn_tokens", float(stats.tokens), {}))
    for metric, key in (("unlearn_step", "step"), ("unlearn_epoch", "epoch")):
        if row.get(key) is not None:
            samples.append(Sample(metric, float(row[key]), {}))
    if row.get("status") != "diverged":
        samples += _evaluation_samples(row)
    return [s for s in samples if math.isfinite(s.value)]


def _weight_sample(name: str, value: float) -> Sample:
    """MGDA reports λ by objective name and, with normalised gradients, effective weights as ``weight.<name>``."""
    if name.startswith("weight."):
        return Sample("unlearn_objective_weight", value, {"objective": name.removeprefix("weight."), "weight": "effective"})
    return Sample("unlearn_objective_weight", value, {"objective": name, "weight": "lambda"})


def _evaluation_samples(row: dict[str, Any]) -> list[Sample]:
    samples = []
    log10_fq = log10_forget_quality(row.get("forget_quality"))
    if log10_fq is not None:
        samples.append(Sample("unlearn_forget_quality_log10", log10_fq, {}))
    for metric, key in (("unlearn_model_utility", "model_utility"), ("unlearn_utility_loss", "utility_loss")):
        if row.get(key) is not None:
            samples.append(Sample(metric, float(row[key]), {}))
    if row.get("eval_seconds"):
        samples.append(Sample("unlearn_eval_seconds", float(row["eval_seconds"]), {}))
    return samples


def trial_status_counts(statuses: Iterable[str]) -> dict[str, int]:
    """Trials per state; Tune's five states always present (a state that emptied must read 0, not vanish)."""
    counts = dict.fromkeys(TRIAL_STATUSES, 0)
    for status in statuses:
        counts[status.lower()] = counts.get(status.lower(), 0) + 1
    return counts


def job_metadata(name: str, run_dir: Path | None) -> dict[str, str]:
    """Ray job metadata: ``job_name`` is the Name column of the dashboard's Jobs page."""
    metadata = {"job_name": name, "unlearn_spec": name}
    if run_dir is not None:
        metadata["run_dir"] = str(run_dir)
    return metadata


# ---------------------------------------------------------------- recording (Ray)
def ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


@functools.cache
def _instrument(name: str):
    """One Ray metric object per process and name (Ray keeps one time series per tag set)."""
    from ray.util.metrics import Counter, Gauge

    info = METRICS[name]
    kind = Counter if info.kind == "counter" else Gauge
    return kind(name, description=info.description, tag_keys=info.tag_keys)


class LiveGauges:
    """The latest value of every gauge this process set, set again every ``refresh_s`` from a daemon
    thread, so a series lives as long as the process (a trial's worker, the Tune driver) that owns it."""

    def __init__(self, refresh_s: float = REFRESH_SECONDS) -> None:
        self.refresh_s = refresh_s
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set(self, name: str, value: float, tags: dict[str, str]) -> None:
        _instrument(name).set(value, tags=tags)
        with self._lock:
            self._values[(name, tuple(sorted(tags.items())))] = value
            if self._thread is None:
                self._thread = threading.Thread(target=self._refresh, name="unlearn-telemetry", daemon=True)
                self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop refreshing; once this returns no gauge is set again (unless Ray hangs for ``timeout_s``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            if not ray_running():  # shut down (a test, a notebook): keep quiet until Ray is back
                continue
            with self._lock:
                values = list(self._values.items())
            for (name, tags), value in values:
                try:
                    _instrument(name).set(value, tags=dict(tags))
                except Exception as err:  # Ray shut down under us (end of a test or a driver): stop quietly
                    logger.debug("telemetry: refresh stopped: %s", err)
                    return


_LIVE_GAUGES = LiveGauges()


def record(name: str, value: float, tags: dict[str, str]) -> None:
    if METRICS[name].kind == "counter":
        _instrument(name).inc(value, tags=tags)
    else:
        _LIVE_GAUGES.set(name, value, tags)


class TrialTelemetry:
    """One trial's per-epoch metrics, recorded by rank 0; does nothing where Ray is not running."""

    def __init__(self, run_id: str, trial_id: str, method: str) -> None:
        self.tags = {"run_id": str(run_id), "trial_id": str(trial_id), "method": str(method)}

    def epoch(self, stats: Any, row: dict[str, Any]) -> None:
        if not ray_running():
            return
        try:
            for sample in epoch_samples(stats, row):
                record(sample.metric, sample.value, self.tags | sample.tags)
        except Exception as err:  # a dashboard must never end a trial that may have run for hours
            logger.warning("telemetry: metrics not recorded: %s", err)


def record_trial_statuses(run_id: str, statuses: Iterable[str]) -> None:
    """Set the ``unlearn_trials`` gauge of a sweep (called by the Tune driver)."""
    if not ray_running():
        return
    for status, count in trial_status_counts(statuses).items():
        record("unlearn_trials", float(count), {"run_id": str(run_id), "status": status})


# ---------------------------------------------------------------- docs and Grafana, from METRICS
def metrics_markdown() -> str:
    """The README's table of metrics, as exported on Prometheus."""
    lines = ["| metric (Prometheus) | kind | labels | what |", "|---|---|---|---|"]
    for name, info in METRICS.items():
        series = ", ".join(f"`{s}`" for s in exported_names(name))
        lines.append(f"| {series} | {info.kind} | {', '.join(info.tag_keys)} | {info.description} |")
    return "\n".join(lines)


def panel_query(name: str) -> tuple[str, str]:
    """(PromQL, legend) of a metric's panel, filtered by the dashboard's run/method/trial variables."""
    info = METRICS[name]
    filters = ", ".join(f'{key}=~"${key}"' for key in TRIAL_TAGS if key in info.tag_keys)
    keys = ", ".join(info.tag_keys)
    legend = " ".join(f"{{{{{key}}}}}" for key in info.tag_keys if key != "run_id")
    series = exported_names(name)
    if info.kind == "counter":  # throughput from the cumulative count (summed over restarted workers)
        return f"sum by ({keys}) (rate({series[0]}{{{filters}}}[$__rate_interval]))", legend
    return f"max by ({keys}) ({series[0]}{{{filters}}})", legend  # one series per trial, whatever WorkerId


def _panel(panel_id: int, name: str, x: int, y: int) -> dict[str, Any]:
    expr, legend = panel_query(name)
    title = name.removeprefix("unlearn_").replace("_", " ")
    if METRICS[name].kind == "counter":
        title += " per second (counter rate)"
    return {
        "id": panel_id, "type": "timeseries", "title": title, "description": METRICS[name].description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": METRICS[name].unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [{"refId": "A", "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}],
    }


def _variable(key: str) -> dict[str, Any]:
    query = f"label_values({EXPORT_PREFIX}unlearn_epoch, {key})"
    return {"name": key, "label": key, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "definition": query, "query": {"query": query, "refId": "StandardVariableQuery"},
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}


def grafana_dashboard() -> dict[str, Any]:
    """A Grafana dashboard with one panel per metric, two panels a row."""
    panels = [_panel(i + 1, name, 12 * (i % 2), 8 * (i // 2)) for i, name in enumerate(METRICS)]
    datasource = {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
                  "current": {}, "hide": 0}
    return {
        "title": "LLM unlearning sweeps", "uid": "unlearn-sweeps", "tags": ["ray", "unlearning"],
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s", "graphTooltip": 1,
        "time": {"from": "now-3h", "to": "now"}, "annotations": {"list": []},
        "templating": {"list": [datasource] + [_variable(key) for key in TRIAL_TAGS]},
        "panels": panels,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m orchestrator.telemetry grafana|markdown``: print the dashboard JSON or the docs table."""
    what = (argv if argv is not None else sys.argv[1:]) or ["grafana"]
    if what[0] == "grafana":
        print(json.dumps(grafana_dashboard(), indent=1))
    elif what[0] == "markdown":
        print(metrics_markdown())
    else:
        print("usage: python -m orchestrator.telemetry grafana|markdown", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
