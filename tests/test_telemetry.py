"""Telemetry: what an epoch records (by hand), the no-op outside Ray, the Grafana dashboard against the
METRICS table, the spec and Ray-job wiring, MLflow/TensorBoard callbacks in a tiny Tune run, and a real
sweep scraped on Ray's Prometheus endpoint."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest
import yaml

from orchestrator import telemetry
from orchestrator.results import read_evals
from orchestrator.spec import SpecError, TrackingSpec, parse_spec
from orchestrator.telemetry import (METRICS, TRIAL_TAGS, Sample, TrialTelemetry, epoch_samples, exported_names,
                                    grafana_dashboard, metrics_markdown, trial_status_counts)
from orchestrator.steps import EpochStats
from tests.conftest import ROOT, tiny_spec

DASHBOARD = ROOT / "docs" / "grafana" / "unlearn_dashboard.json"
ALL_EXPORTED = {series for name in METRICS for series in exported_names(name)}


def as_set(samples: list[Sample]) -> set[tuple]:
    return {(s.metric, round(s.value, 12), tuple(sorted(s.tags.items()))) for s in samples}


# ---------------------------------------------------------------- what an epoch records
def test_epoch_samples_of_an_evaluated_mgda_epoch():
    stats = EpochStats(losses={"forget": 2.5, "retain": 0.75}, weights={"forget": 0.25, "retain": 0.75,
                                                                         "weight.forget": 0.4},
                       steps=3, tokens=1200, seconds=3.0)
    row = {"status": "running", "epoch": 2, "step": 6, "forget_quality": 1e-3, "model_utility": 0.5,
           "utility_loss": 0.05, "eval_seconds": 7.5, "train_seconds": 9.0}
    # By hand: 1200 tokens / 3 s = 400 tok/s; log10(1e-3) = -3.
    expected = {
        ("unlearn_train_loss", 2.5, (("objective", "forget"),)),
        ("unlearn_train_loss", 0.75, (("objective", "retain"),)),
        ("unlearn_objective_weight", 0.25, (("objective", "forget"), ("weight", "lambda"))),
        ("unlearn_objective_weight", 0.75, (("objective", "retain"), ("weight", "lambda"))),
        ("unlearn_objective_weight", 0.4, (("objective", "forget"), ("weight", "effective"))),
        ("unlearn_tokens_per_second", 400.0, ()),
        ("unlearn_tokens", 1200.0, ()),
        ("unlearn_step", 6.0, ()),
        ("unlearn_epoch", 2.0, ()),
        ("unlearn_forget_quality_log10", -3.0, ()),
        ("unlearn_model_utility", 0.5, ()),
        ("unlearn_utility_loss", 0.05, ()),
        ("unlearn_eval_seconds", 7.5, ()),
    }
    samples = epoch_samples(stats, row)
    assert as_set(samples) == expected
    for sample in samples:  # Ray refuses a record missing a declared tag key
        assert set(TRIAL_TAGS) | set(sample.tags) == set(METRICS[sample.metric].tag_keys)


def test_diverged_epoch_records_no_stale_evaluation_and_nothing_non_finite():
    # A diverged row copies the last evaluated row: its FQ was recorded when it was computed.
    stats = EpochStats(losses={"forget": math.nan}, tokens=0, seconds=0.0, diverged=True)
    row = {"status": "diverged", "epoch": 3, "step": 6, "forget_quality": 0.2, "model_utility": 0.4,
           "utility_loss": 0.1, "eval_seconds": 4.0}
    assert as_set(epoch_samples(stats, row)) == {("unlearn_step", 6.0, ()), ("unlearn_epoch", 3.0, ())}


def test_training_only_epoch_has_no_evaluation_samples():
    stats = EpochStats(losses={"forget": -1.0}, tokens=10, seconds=4.0)
    row = {"status": "running", "epoch": 1, "step": 2, "eval_seconds": 0.0}
    assert as_set(epoch_samples(stats, row)) == {
        ("unlearn_train_loss", -1.0, (("objective", "forget"),)), ("unlearn_tokens_per_second", 2.5, ()),
        ("unlearn_tokens", 10.0, ()), ("unlearn_step", 2.0, ()), ("unlearn_epoch", 1.0, ())}


def test_trial_status_counts_keep_empty_states_at_zero():
    counts = trial_status_counts(["RUNNING", "RUNNING", "PENDING", "TERMINATED"])
    assert counts == {"pending": 1, "running": 2, "paused": 0, "terminated": 1, "error": 0}


def test_exported_names_follow_ray_prometheus_naming():
    assert exported_names("unlearn_train_loss") == ("ray_unlearn_train_loss",)
    assert exported_names("unlearn_tokens") == ("ray_unlearn_tokens_total",)
    assert exported_names("unlearn_eval_seconds") == ("ray_unlearn_eval_seconds",)


def test_live_gauges_set_the_latest_value_again_until_closed(monkeypatch):
    """No timing assumed: refreshes are held back (Ray "down") until both values are set, the fake gauge
    signals its 4th refresh, and ``close`` joins the thread."""
    sets = []
    refreshed = threading.Event()
    ray_up = threading.Event()

    class FakeGauge:
        def set(self, value, tags):
            if tags == own_tags:  # the module's own LiveGauges may refresh an earlier test's series meanwhile
                sets.append((value, tags))
                if len(sets) == 2 + 4:  # the two sets below, then 4 refreshes by the thread
                    refreshed.set()

    monkeypatch.setattr(telemetry, "_instrument", lambda name: FakeGauge())
    monkeypatch.setattr(telemetry, "ray_running", ray_up.is_set)
    tags = own_tags = {"run_id": "r", "trial_id": "t", "method": "ga"}
    gauges = telemetry.LiveGauges(refresh_s=0.001)
    gauges.set("unlearn_epoch", 1.0, tags)
    gauges.set("unlearn_epoch", 2.0, tags)
    assert sets == [(1.0, tags), (2.0, tags)]  # each set reaches the gauge at once; no refresh while Ray is down
    ray_up.set()
    assert refreshed.wait(timeout=60), f"only {len(sets) - 2} refreshes"
    gauges.close()
    assert not gauges._thread.is_alive()  # joined: no gauge is set again after close returns
    assert sets[2:] == [(2.0, tags)] * (len(sets) - 2) and len(sets) >= 6  # the latest value, again and again


def test_trial_telemetry_is_a_noop_without_ray(monkeypatch):
    import ray

    recorded = []
    monkeypatch.setattr(telemetry, "record", lambda *args: recorded.append(args))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    stats = EpochStats(losses={"forget": 1.0}, tokens=8, seconds=2.0)
    TrialTelemetry("run-1", "ga_00000", "ga").epoch(stats, {"status": "ok", "epoch": 1, "step": 1})
    telemetry.record_trial_statuses("run-1", ["RUNNING"])
    assert recorded == []

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    TrialTelemetry("run-1", "ga_00000", "ga").epoch(stats, {"status": "ok", "epoch": 1, "step": 1})
    trial = {"run_id": "run-1", "trial_id": "ga_00000", "method": "ga"}
    assert ("unlearn_train_loss", 1.0, trial | {"objective": "forget"}) in recorded
    assert ("unlearn_tokens_per_second", 4.0, trial) in recorded  # 8 tokens / 2 s
    assert len(recorded) == 5  # loss, tok/s, tokens, step, epoch


# ---------------------------------------------------------------- dashboard and docs from METRICS
def test_grafana_dashboard_is_generated_from_the_metrics_table():
    checked_in = json.loads(DASHBOARD.read_text())
    assert checked_in == grafana_dashboard(), "regenerate: python -m orchestrator.telemetry grafana > " + str(DASHBOARD)
    queries = [t["expr"] for p in checked_in["panels"] for t in p["targets"]]
    queries += [v["query"]["query"] for v in checked_in["templating"]["list"] if isinstance(v.get("query"), dict)]
    used = {name for query in queries for name in re.findall(r"\bray_unlearn_\w+", query)}
    assert used <= ALL_EXPORTED, used - ALL_EXPORTED
    for name in METRICS:  # a panel per metric
        assert any(series in query for query in queries for series in exported_names(name)), name
    ids = [p["id"] for p in checked_in["panels"]]
    assert len(ids) == len(set(ids)) == len(METRICS)


def test_metrics_markdown_has_a_row_per_metric():
    rows = [line for line in metrics_markdown().splitlines()[2:]]
    assert len(rows) == len(METRICS)
    for row, name in zip(rows, METRICS):
        assert f"`ray_{name}" in row and METRICS[name].kind in row


# ---------------------------------------------------------------- spec, Ray job, callbacks
def test_tracking_and_metrics_port_fields(tmp_path):
    spec = parse_spec(tiny_spec(tmp_path))
    assert spec.tracking == TrackingSpec() and spec.ray.metrics_export_port is None
    with pytest.raises(SpecError, match="mlflow_tracking_uri"):
        parse_spec(tiny_spec(tmp_path, tracking={"mlflow_tracking_uri": "sqlite:///x.db"}))
    with pytest.raises(SpecError, match="metrics_export_port"):
        parse_spec(tiny_spec(tmp_path, ray={"metrics_export_port": 80}))
    with pytest.raises(SpecError, match="tracking"):
        parse_spec(tiny_spec(tmp_path, tracking={"wandb": True}))


@pytest.mark.parametrize("address", [None, "ray://head:10001"])
def test_init_ray_names_the_job_and_sets_the_metrics_port(address, monkeypatch, tmp_path):
    import ray

    from orchestrator import api

    spec = parse_spec(tiny_spec(tmp_path, name="forget-sweep", ray={"metrics_export_port": 9311}))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name in api.RAY_ENV_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    captured = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: captured.append(kwargs))
    api.init_ray(spec, address, tmp_path / "run")
    (kwargs,) = captured
    assert kwargs["job_config"].metadata == {"job_name": "forget-sweep", "unlearn_spec": "forget-sweep",
                                             "run_dir": str(tmp_path / "run")}
    if address is None:
        assert kwargs["_metrics_export_port"] == 9311
    else:
        assert kwargs["address"] == address and "_metrics_export_port" not in kwargs  # the cluster's own port


def test_tune_callbacks_from_the_tracking_spec(tmp_path):
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.logger import TBXLoggerCallback

    from orchestrator.tracking import TrialStatusCallback, tune_callbacks

    only_status = tune_callbacks(TrackingSpec(), tmp_path, "run-1", "exp")
    assert [type(c) for c in only_status] == [TrialStatusCallback]
    both = tune_callbacks(TrackingSpec(tensorboard=True, mlflow=True), tmp_path, "run-1", "exp")
    assert [type(c) for c in both] == [TrialStatusCallback, TBXLoggerCallback, MLflowLoggerCallback]
    assert both[2].tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert both[2].experiment_name == "exp" and both[2].tags == {"run_id": "run-1"}
    custom = tune_callbacks(TrackingSpec(mlflow=True, mlflow_tracking_uri="http://mlflow:5000"), tmp_path, "r", "e")
    assert custom[1].tracking_uri == "http://mlflow:5000"


def reporting_trainable(config):
    from ray import tune

    for step in range(2):
        tune.report({"loss": config["x"] / (step + 1), "epoch": step + 1})


def docs_tracking_section() -> dict:
    """The ``tracking:`` YAML block of docs/grafana/README.md, as written there."""
    text = (ROOT / "docs" / "grafana" / "README.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if b.startswith("tracking:")]
    return yaml.safe_load(block)["tracking"]


@pytest.mark.integration
def test_mlflow_and_tensorboard_callbacks_in_a_tiny_tune_run(ray_local, tmp_path, monkeypatch):
    """The docs' ``tracking:`` block, validated as a spec section, drives both exporters in a real Tune run."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from orchestrator.tracking import mlflow_tracking_uri, tune_callbacks

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may land in the working directory (MLflow's default ./mlruns)
    tracking = parse_spec(tiny_spec(tmp_path / "cache", tracking=docs_tracking_section())).tracking
    assert tracking.tensorboard and tracking.mlflow and tracking.mlflow_tracking_uri is None
    run_dir = tmp_path / "run"
    tuner = tune.Tuner(
        tune.with_resources(reporting_trainable, {"cpu": 0.01}), param_space={"x": tune.grid_search([1.0, 3.0])},
        run_config=tune.RunConfig(name="tune", storage_path=str(run_dir), verbose=0,
                                  callbacks=tune_callbacks(tracking, run_dir, "run-7", "tiny")))
    grid = tuner.fit()
    assert all(result.error is None for result in grid)

    client = MlflowClient(mlflow_tracking_uri(tracking, run_dir))
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    # Each trial reported loss x/1 then x/2: the last value is x/2.
    assert sorted(run.data.metrics["loss"] for run in runs) == [0.5, 1.5]
    assert all(run.info.status == "FINISHED" and run.data.tags["run_id"] == "run-7" for run in runs)
    assert len(list((run_dir / "tune").glob("*/events.out.tfevents.*"))) == 2
    assert list(cwd.iterdir()) == []


# ---------------------------------------------------------------- a real sweep, scraped
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SERIES = re.compile(r"^(ray_unlearn_\w+)\{(.*)\}\s+(\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return []  # not up yet, or already down
    series = []
    for line in text.splitlines():
        match = SERIES.match(line)
        if match:
            series.append((match[1], dict(LABEL.findall(match[2])), float(match[3])))
    return series


@pytest.mark.integration
def test_a_sweep_exports_unlearn_metrics_on_ray_prometheus_endpoint(tiny_cache, tmp_path):
    """`unlearn run` in its own process (its own local Ray, whatever this pytest process runs), scraped
    every second while it runs: Ray drops a gauge ~20 s after the process that set it exits."""
    port = free_port()
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec(tiny_cache, ray={"num_cpus": 2, "metrics_export_port": port})))
    run_dir = tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_TMPDIR=ray_tmp, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(spec_file), "--run-dir", str(run_dir)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seen: list[tuple[str, dict[str, str], float]] = []
    deadline = time.monotonic() + 1200
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            seen += scrape(port)
            time.sleep(1.0)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]

    (tmp_path / "scraped.txt").write_text("\n".join(f"{n} {tags} {v}" for n, tags, v in seen))  # to debug
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert {name for name, _, _ in seen} <= ALL_EXPORTED

    def values(name: str, **labels: str) -> list[float]:
        return [v for n, tags, v in seen if n == name and all(tags.get(k) == x for k, x in labels.items())]

    trial = next(tags for name, tags, _ in seen if name == "ray_unlearn_epoch" and tags.get("run_id") == run_id)
    assert trial["method"] == "ga" and trial["trial_id"].startswith("ga_")
    tags = {"run_id": run_id, "trial_id": trial["trial_id"], "method": "ga"}
    assert values("ray_unlearn_train_loss", objective="forget", **tags)  # GA's one objective
    assert max(values("ray_unlearn_tokens_total", **tags)) > 0
    assert max(values("ray_unlearn_tokens_per_second", **tags)) > 0
    assert max(values("ray_unlearn_step", **tags)) >= 1
    assert all(v <= 0 for v in values("ray_unlearn_forget_quality_log10", **tags))
    assert values("ray_unlearn_forget_quality_log10", **tags)  # epoch 1 evaluated while the gang was alive
    rows = [r for r in read_evals(run_dir).to_pylist() if r["trial_id"] == trial["trial_id"]]
    for key in ("model_utility", "utility_loss"):  # utility loss is null when the target's utility is 0
        assert bool(values(f"ray_unlearn_{key}", **tags)) == any(r[key] is not None for r in rows), key
    assert max(values("ray_unlearn_eval_seconds", **tags)) > 0
    assert 1.0 in values("ray_unlearn_trials", run_id=run_id, status="running")
