"""Sweeps on a Ray cluster of several nodes, every node a separate raylet on this machine (loopback).

- placement: a 2-worker gang under STRICT_SPREAD lands on two nodes, its results read back;
- node loss: the node holding one of a gang's workers is removed mid-trial; the trial restarts from its
  last checkpoint once a node joins again and finishes once, epochs contiguous, none evaluated twice.

The driver (`unlearn run --address`) runs in a process of its own on the head, as on a real cluster; the
run directory is the storage every node writes to (shared here because the nodes share a disk).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from orchestrator.api import RAY_ENV_DEFAULTS
from orchestrator.results import read_evals
from orchestrator.spec import parse_spec
from orchestrator.sweep import HEAD_RESOURCE, placement_problem
from tests.conftest import ROOT, TINY_SPEC, tiny_spec
from tests.test_reliability import FIRST_RUN_S, kill_leftovers, registered_checkpoints, trials_by_id, wait_for


# ---------------------------------------------------------------- placement rules (no cluster)
def _spec(**scaling):
    return parse_spec(tiny_spec("/tmp/unused", scaling={**TINY_SPEC["scaling"], **scaling}))


HEAD = {"CPU": 1.0, HEAD_RESOURCE: 1.0}
WORKER = {"CPU": 1.0}


def test_strict_spread_needs_a_node_per_worker():
    spec = _spec(num_workers=2, cpus_per_worker=0.99, placement_strategy="STRICT_SPREAD")
    assert placement_problem(spec, [HEAD, WORKER]) is None
    problem = placement_problem(spec, [{"CPU": 4.0, HEAD_RESOURCE: 1.0}])  # 4 CPUs, but one node
    assert problem.startswith("field 'scaling.placement_strategy': STRICT_SPREAD") and "1 of the cluster's 1" in problem
    # a node too small for one worker does not count
    assert "1 of the cluster's 2" in placement_problem(spec, [HEAD, {"CPU": 0.5}])


def test_strict_pack_needs_one_node_for_the_gang():
    spec = _spec(num_workers=2, cpus_per_worker=0.99, placement_strategy="STRICT_PACK")
    assert "STRICT_PACK" in placement_problem(spec, [HEAD, WORKER])
    assert placement_problem(spec, [{"CPU": 2.0, HEAD_RESOURCE: 1.0}]) is None
    # PACK and SPREAD are preferences: any cluster with the CPUs will do
    for strategy in ("PACK", "SPREAD"):
        assert placement_problem(_spec(num_workers=2, placement_strategy=strategy), [HEAD, WORKER]) is None


def test_drivers_on_head_need_cpu_on_the_head():
    head_without_cpu = {HEAD_RESOURCE: 1.0}
    problem = placement_problem(_spec(num_workers=1), [head_without_cpu, WORKER])
    assert problem.startswith("field 'scaling.drivers_on_head'")
    assert placement_problem(_spec(num_workers=1, drivers_on_head=False), [head_without_cpu, WORKER]) is None


def test_trial_drivers_ask_for_the_head_node():
    from orchestrator.sweep import DRIVER_CPU, driver_resources

    assert driver_resources(True) == {"cpu": DRIVER_CPU, HEAD_RESOURCE: 0.01}
    assert driver_resources(False) == {"cpu": DRIVER_CPU}


# ---------------------------------------------------------------- a local multi-node cluster
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def two_nodes(monkeypatch):
    """A head (1 CPU, dashboard) and one worker node (1 CPU), each its own raylet on 127.0.0.1.

    The nodes' processes inherit this environment: the Ray settings `unlearn run` gives a cluster it starts."""
    from ray.cluster_utils import Cluster

    for name, value in RAY_ENV_DEFAULTS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1")
    # Ray turns 127.0.0.1 into the machine's network address unless clusters are local-only (its switch for
    # macOS and Windows): with it every node, and the driver joining them, stays on loopback.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # Ray's socket paths must stay short
    # The cluster's address file too: a plain ray.init() elsewhere on the machine must not join this cluster.
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)
    os.makedirs(os.path.join(temp_dir, "ray"))
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
        "temp_dir": temp_dir, "node_ip_address": "127.0.0.1"})
    worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    yield cluster, worker
    cluster.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def start_unlearn(cluster, tmp_path: Path, *args: str, log_name: str = "driver.log") -> subprocess.Popen:
    """`unlearn ARGS --address CLUSTER` in a process (and session) of its own, as a driver on the head."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(ROOT),
                                                                        "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    log = open(tmp_path / log_name, "w")
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *args, "--address", cluster.address], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def start_driver(cluster, tmp_path: Path, spec: dict) -> tuple[subprocess.Popen, Path]:
    """`unlearn run SPEC` on the cluster; returns the driver and the run directory."""
    spec_file, run_dir = tmp_path / "spec.yaml", tmp_path / "run"
    spec_file.write_text(yaml.safe_dump(spec))
    return start_unlearn(cluster, tmp_path, "run", str(spec_file), "--run-dir", str(run_dir)), run_dir


def finish(driver: subprocess.Popen, tmp_path: Path, timeout: float = FIRST_RUN_S, log_name: str = "driver.log") -> None:
    try:
        driver.wait(timeout=timeout)
    finally:
        if driver.poll() is None:
            family = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
            driver.kill()
            kill_leftovers(family, grace=5)
    assert driver.returncode == 0, (tmp_path / log_name).read_text()[-4000:]


def train_worker_nodes(cluster, state: str | None = None) -> list[dict]:
    """Ray Train worker actors of the cluster (alive and dead), with the node each ran on."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker")] + ([("state", "=", state)] if state else [])
    return list_actors(address=f"http://{cluster.webui_url}", filters=filters, detail=True, limit=1000, raise_on_missing_output=False)


def resumed_epoch(log: Path, trial_id: str) -> int:
    """The epoch whose checkpoint the restarted gang continued from, as its rank 0 printed it."""
    found = re.findall(rf"\[{trial_id}\] resumed from epoch (\d+)'s checkpoint", log.read_text())
    assert len(found) == 1, f"{len(found)} resume lines for {trial_id} in {log.name}"
    return int(found[0])


def evals_times(run_dir: Path, trial_id: str) -> dict[int, int]:
    return {int(p.stem.rsplit("-e", 1)[1]): p.stat().st_mtime_ns for p in (run_dir / "evals").glob(f"{trial_id}-e*.parquet")}


# Enough epochs (about 1 s each here) that the fault below lands mid-trial, with epochs left after it.
LONG_TRIAL = 10


def spread_spec(cache: Path, epochs: int) -> dict:
    return tiny_spec(cache, scaling={**TINY_SPEC["scaling"], "num_workers": 2, "cpus_per_worker": 0.99,
                                     "placement_strategy": "STRICT_SPREAD", "max_failures": 2},
                     sweep={"methods": [{"name": "ga", "space": {"lr": {"grid": [1e-4]}, "epochs": {"grid": [epochs]}}}]})


def running_gang(cluster, run_dir: Path, epoch: int, alive) -> tuple[str, list[dict]]:
    """Once the trial has written ``epoch``'s row: its id and its two live Train workers (prepare's gangs
    are gone by then; the trial's gang goes on to the next epoch)."""
    row = wait_for(lambda: next(iter((run_dir / "evals").glob(f"ga_*-e{epoch:04d}.parquet")), None), FIRST_RUN_S,
                   alive, f"the trial's epoch-{epoch} evaluation")
    gang = wait_for(lambda: (a := train_worker_nodes(cluster, "ALIVE")) and len(a) == 2 and a, 60, alive,
                    "the gang's two workers")
    return row.name.rsplit("-e", 1)[0], gang


@pytest.mark.integration
def test_a_gang_spread_over_two_nodes_completes(two_nodes, tiny_cache, tmp_path):
    cluster, worker = two_nodes
    driver, run_dir = start_driver(cluster, tmp_path, spread_spec(tiny_cache, epochs=3))
    _, gang = running_gang(cluster, run_dir, 1, lambda: driver.poll() is None)
    finish(driver, tmp_path)

    assert {a["node_id"] for a in gang} == {cluster.head_node.node_id, worker.node_id}  # one worker on each
    (rows,) = trials_by_id(read_evals(run_dir).to_pylist()).values()
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["status"] == "ok"
    assert rows[-1]["num_workers"] == 2 and rows[-1]["forget_prob"] is not None
    assert (run_dir / "ranking.parquet").exists()
    # What the user watched: one line per epoch, not Ray Train's report dicts and checkpoint notices.
    console = (tmp_path / "driver.log").read_text()
    assert f"[{rows[0]['trial_id']}] epoch 3/3 ok" in console
    assert "Reporting training result" not in console and "Checkpoint successfully created" not in console


@pytest.mark.integration
def test_a_lost_node_costs_a_restart_from_the_last_checkpoint(two_nodes, tiny_cache, tmp_path):
    cluster, lost = two_nodes
    driver, run_dir, alive, trial_id, gang = start_long_trial(cluster, tmp_path, tiny_cache)
    wait_for(lambda: registered_checkpoints(run_dir, trial_id), 120, alive, "epoch 1's checkpoint")
    cluster.remove_node(lost, allow_graceful=False)
    removed_at, before = time.monotonic(), evals_times(run_dir, trial_id)
    assert {a["node_id"] for a in gang} == {cluster.head_node.node_id, lost.node_id}
    # STRICT_SPREAD: the one node left cannot hold the gang, which waits; capacity returns with a new node.
    time.sleep(5)
    replacement = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    old = {a["actor_id"] for a in gang}
    restarted = wait_for(lambda: len(a := [w for w in train_worker_nodes(cluster, "ALIVE") if w["actor_id"] not in old])
                         == 2 and a, 300, alive, "the gang restarted")
    print(f"node lost → gang restarted: {time.monotonic() - removed_at:.1f} s")
    finish(driver, tmp_path)

    assert {a["node_id"] for a in restarted} == {cluster.head_node.node_id, replacement.node_id}
    assert_resumed(run_dir, trial_id, before, tmp_path / "driver.log")


def start_long_trial(cluster, tmp_path: Path, cache: Path):
    """A LONG_TRIAL-epoch trial under way: (driver, run dir, driver alive?, trial id, its gang's workers)."""
    driver, run_dir = start_driver(cluster, tmp_path, spread_spec(cache, epochs=LONG_TRIAL))
    alive = lambda: driver.poll() is None  # noqa: E731
    trial_id, gang = running_gang(cluster, run_dir, 1, alive)
    return driver, run_dir, alive, trial_id, gang


def assert_resumed(run_dir: Path, trial_id: str, before: dict[int, int], log: Path) -> None:
    """One row per epoch 1..LONG_TRIAL; the gang continued from a checkpoint (not epoch 0) and left the rows up
    to it as they were. An epoch after it may have been written just before the fault, ahead of its
    checkpoint: it is redone and its row replaced under the same name, so the table still holds it once."""
    (rows,) = trials_by_id(read_evals(run_dir).to_pylist()).values()
    assert [r["epoch"] for r in rows] == list(range(1, LONG_TRIAL + 1))  # contiguous, none twice
    assert [r["status"] for r in rows] == ["running"] * (LONG_TRIAL - 1) + ["ok"]
    resumed = resumed_epoch(log, trial_id)
    assert 1 <= resumed < LONG_TRIAL
    after = evals_times(run_dir, trial_id)
    assert all(after[epoch] == before[epoch] for epoch in range(1, resumed + 1))


@pytest.mark.integration
def test_a_lost_driver_is_resumed_on_the_cluster_from_the_same_storage(two_nodes, tiny_cache, tmp_path):
    from tests.test_reliability import tune_trial_states

    cluster, _ = two_nodes
    driver, run_dir, alive, trial_id, gang = start_long_trial(cluster, tmp_path, tiny_cache)
    wait_for(lambda: registered_checkpoints(run_dir, trial_id) and tune_trial_states(run_dir), 120, alive,
             "epoch 1's checkpoint and Tune's saved state")
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything it started; the cluster stays
    driver.wait(timeout=30)
    old = {a["actor_id"] for a in gang}
    wait_for(lambda: not any(a["actor_id"] in old for a in train_worker_nodes(cluster, "ALIVE")), 60, lambda: True,
             "the lost driver's gang to end with it")
    before = evals_times(run_dir, trial_id)

    resumed = start_unlearn(cluster, tmp_path, "resume", str(run_dir), log_name="resume.log")
    finish(resumed, tmp_path, log_name="resume.log")
    assert_resumed(run_dir, trial_id, before, tmp_path / "resume.log")
    assert (run_dir / "ranking.parquet").exists()
