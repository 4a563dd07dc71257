"""`ray job submit --working-dir . -- unlearn run SPEC` against `ray start --head` on loopback."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, tiny_spec

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ray_job_submit_runs_a_sweep_and_its_tables_are_readable(tiny_cache, tmp_path):
    bin_dir = Path(sys.executable).parent
    ray_cli = str(bin_dir / "ray")
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    gcs_port, dashboard_port = _free_port(), _free_port()
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    # Auth disabled on this throwaway loopback cluster; with Ray's default token auth the submitting
    # side sets RAY_AUTH_MODE=token instead (README, docs/cluster.md). The cluster's processes get their
    # own dashboard as state API address (another Ray on this machine must not be asked instead); the
    # CLI reads the same variable, so it cannot point at a local test cluster either.
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="disabled",
               RAY_API_SERVER_ADDRESS=dashboard)
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run(
        [ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port), "--num-cpus", "2",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--temp-dir", temp_dir,
         "--include-dashboard", "true", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        spec = tiny_spec(tiny_cache, scaling={"num_workers": 1, "cpus_per_worker": 0.99, "zero_stage": 2},
                         training={"epochs": 1, "batch_size": 4, "max_length": 64, "warmup_epochs": 0})
        spec["run_dir"] = str(tmp_path / "run")
        spec_path = tmp_path / "job.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        submit = subprocess.run(
            [ray_cli, "job", "submit", "--address", dashboard, "--working-dir", str(ROOT),
             "--submission-id", f"unlearn-test-{gcs_port}", "--", "unlearn", "run", str(spec_path)],
            env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
        )
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
        assert "succeeded" in submit.stdout.lower()
        from orchestrator.results import read_evals

        rows = read_evals(tmp_path / "run").to_pylist()
        assert {r["method"] for r in rows} == {"target", "retain", "ga"}
        (final,) = [r for r in rows if r["method"] == "ga" and r["status"] == "ok"]
        assert final["epoch"] == 2 and final["forget_quality"] is not None  # TINY_SPEC's space: 2 epochs
        assert (tmp_path / "run" / "ranking.parquet").exists()
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_cluster(temp_dir: str) -> None:
    """Stop only this test's cluster (`ray stop` would stop every Ray on the machine): its daemons carry
    the temp dir in their command lines, and its workers exit when their raylet is gone."""
    import psutil

    daemons = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir in " ".join(process.info["cmdline"] or []):
                daemons.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for process in daemons:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(daemons, timeout=20)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
