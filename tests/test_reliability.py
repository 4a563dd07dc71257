"""Faults a sweep must survive without losing or duplicating results.

- a trial whose loss turns non-finite stops itself (status "diverged", its row measuring nothing) while
  its neighbour in the sweep finishes;
- a writer killed mid-write leaves no partial Parquet file where readers look;
- a Ray Train worker killed mid-trial: the gang restarts from the trial's last checkpoint, one row per epoch;
- the driver killed mid-sweep: ``unlearn resume`` leaves finished trials alone and completes the others.

The integration tests run on a real local Ray (2 CPUs) with real DeepSpeed on the tiny embedded job.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from orchestrator.results import read_evals, write_evals
from orchestrator.spec import parse_spec
from tests.conftest import ROOT, TINY_SPEC, tiny_spec

FIRST_RUN_S = 900  # prepare (the tiny models are trained once per session) + the trials, on 2 shared cores


def trials_by_id(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Unlearning rows grouped by trial, each trial's rows by epoch (reference rows left out)."""
    trials: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["method"] not in ("target", "retain"):
            trials.setdefault(row["trial_id"], []).append(row)
    return {trial: sorted(rs, key=lambda r: r["epoch"]) for trial, rs in trials.items()}


def wait_for(condition: Callable[[], Any], timeout: float, alive: Callable[[], bool], what: str) -> Any:
    """Poll ``condition`` until it returns something truthy; fail if the run ends or time runs out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if not alive():
            pytest.fail(f"the run ended before {what}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def train_workers() -> list[psutil.Process]:
    """This test process's Ray Train worker processes (Ray names them ray::RayTrainWorker...)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def registered_checkpoints(run_dir: Path, trial_id: str) -> int:
    """How many checkpoints Ray Train has registered for a trial's gang (its snapshot in the run dir);
    a restarted gang, or a trainer fitted again under the same name, resumes from the latest of them."""
    snapshot = run_dir / "train" / trial_id / "checkpoint_manager_snapshot.json"
    try:
        return len(json.loads(snapshot.read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):  # not there yet, or caught mid-write
        return 0


def kill_leftovers(processes: list[psutil.Process], grace: float = 15.0) -> list[int]:
    """SIGKILL those of ``processes`` still alive after ``grace`` seconds (psutil checks that a pid
    still belongs to the process it named, so a reused pid is never hit). Returns the pids killed."""
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    return [proc.pid for proc in alive]


# ---------------------------------------------------------------- divergence
def test_an_update_that_breaks_the_model_is_caught_before_evaluation():
    """Every loss an epoch computes comes before its update, so they can all be finite while the model
    left behind is not: gradient ascent at lr 1e6 (AdamW moves each weight by ~lr) shows it."""
    import torch

    from orchestrator.models import build_embedded_model
    from orchestrator.steps import produces_finite_logits

    model = build_embedded_model(400, 32, 2, 2, 64, 128, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e6)
    ids = torch.randint(3, 400, (4, 20), generator=torch.Generator().manual_seed(0))
    batches = {"forget": {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}}
    assert produces_finite_logits(model, batches)
    losses_finite = []
    for _ in range(2):
        loss = -model(input_ids=ids, labels=ids).loss
        losses_finite.append(bool(torch.isfinite(loss)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses_finite == [True, True]
    assert not produces_finite_logits(model, batches)


def _nan_on_one_rank_worker(rank: int, port: int, out_dir: str) -> None:
    """One gloo rank of a 2-worker ZeRO-2 gang; rank 1's loss turns NaN at its second step."""
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    from orchestrator.models import build_embedded_model
    from orchestrator.steps import gather_epoch, run_epoch
    from orchestrator.worker import FineTune

    class NaNOnRankOne(FineTune):
        calls = 0

        def objectives(self, inputs):
            objectives = super().objectives(inputs)
            self.calls += 1
            if rank == 1 and self.calls == 2:
                objectives = {name: value * float("nan") for name, value in objectives.items()}
            return objectives

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build of the shm all-reduce
    deepspeed.init_distributed(dist_backend="gloo")
    model = build_embedded_model(400, 32, 2, 2, 64, 128, seed=0)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 1 << 30}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config=config)
    ids = torch.randint(3, 400, (2, 12), generator=torch.Generator().manual_seed(rank))
    loader = [{"forget": {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}}] * 4
    stats = gather_epoch(run_epoch(engine, None, NaNOnRankOne(None), loader, list(model.parameters()),
                                   torch.device("cpu")), world_size=2)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"steps": stats.steps, "diverged": stats.diverged}))
    torch.distributed.destroy_process_group()


def test_nan_on_one_rank_stops_the_whole_gang_without_a_hang(tmp_path):
    """A NaN seen by one worker only: every rank must agree before the next update, or the ranks that go on
    block in the gradient all-reduce forever. Both ranks stop after the one good step and report it."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.spawn(_nan_on_one_rank_worker, args=(port, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the gang hung after a NaN on one rank")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results == [{"steps": 1, "diverged": True}] * 2


@pytest.mark.integration
def test_divergent_trial_stops_itself_while_its_neighbour_finishes(ray_local, tiny_cache, tmp_path):
    from orchestrator.api import run

    # lr 1e6 without clipping: AdamW moves every weight by ~1e6 per step; the tiny job takes one step per
    # epoch, and after the second the model's logits overflow (its epoch-1 evaluation is still finite).
    # The same sweep holds a sane trial at 1e-4.
    spec = parse_spec(tiny_spec(
        tiny_cache, training={**TINY_SPEC["training"], "max_grad_norm": 0},
        sweep={"methods": [{"name": "ga", "space": {"lr": {"grid": [1e-4, 1e6]}, "epochs": {"grid": [3]}}}]},
    ))
    result = run(spec, run_dir=tmp_path / "run", log=lambda line: None)

    trials = trials_by_id(result.evals.to_pylist())
    assert len(trials) == 2
    by_lr = {json.loads(rows[0]["params"])["lr"]: rows for rows in trials.values()}
    healthy, broken = by_lr[1e-4], by_lr[1e6]

    assert [r["epoch"] for r in healthy] == [1, 2, 3]
    assert [r["status"] for r in healthy] == ["running", "running", "ok"]
    assert all(math.isfinite(r["forget_prob"]) and 0 <= r["forget_quality"] <= 1 for r in healthy)

    statuses = [r["status"] for r in broken]
    assert statuses[-1] == "diverged" and statuses.count("diverged") == 1  # it stopped at once
    assert set(statuses[:-1]) <= {"running"} and len(broken) >= 2, statuses  # at least one good evaluation
    assert [r["epoch"] for r in broken] == list(range(1, len(broken) + 1))
    good, stopped = broken[-2], broken[-1]
    # The diverged row measures nothing (its model cannot be scored) and says so; nothing came after it.
    reasons = json.loads(stopped["not_measured"])
    for name in ("forget_prob", "retain_prob", "forget_quality", "model_utility"):
        assert math.isfinite(good[name]) and stopped[name] is None and "diverged" in reasons[name]
    files = sorted(p.name for p in (tmp_path / "run" / "evals").glob(f"{stopped['trial_id']}-*.parquet"))
    assert len(files) == len(broken)
    assert result.ranking is not None


# ---------------------------------------------------------------- atomic writes
_HALF_WRITER = textwrap.dedent("""
    import io, os, sys, time
    import pyarrow.parquet as pq
    from orchestrator import results

    real_write_table = pq.write_table

    def write_half_then_hang(table, where, **kwargs):
        buffer = io.BytesIO()
        real_write_table(table, buffer, **kwargs)
        data = buffer.getvalue()
        with open(where, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        print("HALFWAY", len(data), flush=True)
        time.sleep(600)

    results.pq.write_table = write_half_then_hang
    rows = [dict(run_id="r", trial_id="ga_victim", method="ga", params="{}", status="running", epoch=1, step=i,
                 forget_prob=i / 7.0) for i in range(20000)]
    results.write_evals(sys.argv[1], rows, "ga_victim", 1)
""")


def test_writer_killed_mid_write_leaves_no_partial_parquet(tmp_path):
    import pyarrow.dataset as ds

    run_dir = tmp_path / "run"
    done = dict(run_id="r", trial_id="ga_done", method="ga", params="{}", status="ok", epoch=1, step=3, forget_prob=0.5)
    write_evals(run_dir, [done], "ga_done", 1)

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    writer = subprocess.Popen([sys.executable, "-c", _HALF_WRITER, str(run_dir)], env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        line = writer.stdout.readline()  # the writer stops halfway through the file
        assert line.startswith("HALFWAY"), line
        os.kill(writer.pid, signal.SIGKILL)
        assert writer.wait(timeout=30) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()

    evals = run_dir / "evals"
    assert sorted(p.name for p in evals.iterdir() if not p.name.startswith(".")) == ["ga_done-e0001.parquet"]
    hidden = [p for p in evals.iterdir() if p.name.startswith(".")]
    assert len(hidden) == 1 and hidden[0].name.endswith(".tmp")  # the half-written file, under a hidden name
    assert 0 < hidden[0].stat().st_size < int(line.split()[1])
    with pytest.raises(Exception):
        pq.read_table(hidden[0])  # it really is partial
    assert read_evals(run_dir).to_pylist()[0]["trial_id"] == "ga_done"
    assert read_evals(run_dir).num_rows == 1
    assert ds.dataset(evals, format="parquet").to_table().num_rows == 1  # pyarrow's own reader skips it too


# ---------------------------------------------------------------- a Ray Train worker dies
@pytest.mark.integration
def test_killed_train_worker_restarts_from_the_last_checkpoint(ray_local, tiny_cache, tmp_path):
    from orchestrator.api import run

    spec = parse_spec(tiny_spec(
        tiny_cache, scaling={**TINY_SPEC["scaling"], "max_failures": 2},
        sweep={"methods": [{"name": "ga", "space": {"lr": {"grid": [1e-4]}, "epochs": {"grid": [4]}}}]},
    ))
    run_dir = tmp_path / "run"
    outcome: dict[str, Any] = {}

    def sweep() -> None:
        try:
            outcome["result"] = run(spec, run_dir=run_dir, log=lambda line: None)
        except BaseException as err:  # noqa: BLE001 - reported by the test thread below
            outcome["error"] = err

    thread = threading.Thread(target=sweep, daemon=True)
    thread.start()
    evals = run_dir / "evals"
    # Kill after the first evaluation, once its checkpoint is registered: a restart from the last checkpoint
    # must then leave epoch 1's file untouched. The kill lands in epoch 2 of 4.
    first = wait_for(lambda: next(iter(evals.glob("ga_*-e0001.parquet")), None), FIRST_RUN_S, thread.is_alive,
                     "the trial's first evaluation")
    trial_id = first.name.rsplit("-e", 1)[0]
    wait_for(lambda: registered_checkpoints(run_dir, trial_id), 120, thread.is_alive, "epoch 1's checkpoint")
    first_mtime = first.stat().st_mtime_ns
    gang = wait_for(lambda: (w := train_workers()) and len(w) == 2 and w, 60, thread.is_alive, "two train workers")
    victim = gang[-1]
    victim.send_signal(signal.SIGKILL)

    replacements: set[int] = set()
    deadline = time.monotonic() + 600
    while thread.is_alive() and time.monotonic() < deadline:
        replacements |= {w.pid for w in train_workers()} - {w.pid for w in gang}
        time.sleep(0.5)
    thread.join(timeout=5)
    assert not thread.is_alive(), "the sweep did not finish after the worker was killed"
    assert "error" not in outcome, outcome.get("error")

    assert not victim.is_running()
    assert replacements, "no new train worker was started after the kill"
    (rows,) = trials_by_id(outcome["result"].evals.to_pylist()).values()
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]  # no gap, no duplicate
    assert [r["status"] for r in rows] == ["running", "running", "running", "ok"]
    assert first.stat().st_mtime_ns == first_mtime  # resumed from a checkpoint, not from scratch
    assert rows[0]["trial_id"] == trial_id
    assert len(list(evals.glob(f"{trial_id}-*.parquet"))) == 4


# ---------------------------------------------------------------- the driver dies
def tune_trial_states(run_dir: Path) -> dict[str, str]:
    """Tune trial id → status, from the newest experiment state saved in the run directory."""
    states = sorted((run_dir / "tune").glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime_ns)
    if not states:
        return {}
    try:
        saved = json.loads(states[-1].read_text())
    except (OSError, json.JSONDecodeError):  # caught mid-write: the next poll reads it
        return {}
    trials = [json.loads(trial_json) for trial_json, _ in saved["trial_data"]]
    return {trial["trial_id"]: trial["status"] for trial in trials}


def killed_mid_sweep(run_dir: Path) -> bool:
    """One trial is finished in Tune's saved state; another has written its first evaluation and Ray
    Train has registered that epoch's checkpoint."""
    finished = {f"ga_{tid}" for tid, status in tune_trial_states(run_dir).items() if status == "TERMINATED"}
    started = {p.name.rsplit("-e", 1)[0] for p in (run_dir / "evals").glob("ga_*-e0001.parquet")}
    return bool(finished) and any(registered_checkpoints(run_dir, t) for t in started - finished)


def watch_until_exit(proc: subprocess.Popen, timeout: float) -> list[psutil.Process]:
    """Wait for ``proc``; return every descendant seen meanwhile (orphans cannot be found afterwards)."""
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            seen.update((child.pid, child) for child in psutil.Process(proc.pid).children(recursive=True))
        except psutil.Error:
            pass
        time.sleep(1.0)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    return list(seen.values())


def file_times(directory: Path, prefix: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.glob(f"{prefix}-*.parquet")}


@pytest.mark.integration
def test_killed_driver_resumes_without_rerunning_finished_trials(tiny_cache, tmp_path):
    spec = tiny_spec(tiny_cache, ray={"num_cpus": 2},
                     sweep={"methods": [{"name": "ga", "space": {"lr": {"grid": [1e-4, 3e-4]}, "epochs": {"grid": [2]}}}]})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "run"
    # The driver starts its own local Ray; RAY_TMPDIR keeps its session out of /tmp/ray (short path:
    # Ray's socket names must fit 107 bytes). Tune saves its state every second, so the kill below can
    # wait until the finished trial is recorded as finished.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_TMPDIR=str(ray_tmp), OMP_NUM_THREADS="1", TUNE_GLOBAL_CHECKPOINT_S="1")
    command = [sys.executable, "-m", "orchestrator"]
    family: list[psutil.Process] = []
    driver = None
    try:
        with open(tmp_path / "driver.log", "w") as log:
            driver = subprocess.Popen([*command, "run", str(spec_file), "--run-dir", str(run_dir)], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            wait_for(lambda: killed_mid_sweep(run_dir), FIRST_RUN_S, lambda: driver.poll() is None,
                     "one finished trial and one started")
            family = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=30)
        # Ray's processes are tied to the driver (they die with it); anything of that session still alive
        # after the grace period is killed here, by pid, and nothing outside that process tree is touched.
        kill_leftovers(family[1:])
        assert list(ray_tmp.glob("ray/session_*")), "the driver's Ray session was not under RAY_TMPDIR"

        evals, samples = run_dir / "evals", run_dir / "samples"
        finished = sorted(f"ga_{t}" for t, s in tune_trial_states(run_dir).items() if s == "TERMINATED")
        before = {trial: (file_times(evals, trial), file_times(samples, trial)) for trial in finished}
        (unfinished,) = {p.name.rsplit("-e", 1)[0] for p in evals.glob("ga_*.parquet")} - set(finished)
        unfinished_before = file_times(evals, unfinished)
        with open(tmp_path / "resume.log", "w") as log:
            resumed = subprocess.Popen([*command, "resume", str(run_dir)], env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            family = watch_until_exit(resumed, FIRST_RUN_S)
        assert resumed.returncode == 0, (tmp_path / "resume.log").read_text()[-3000:]
    finally:
        if driver is not None and driver.poll() is None:  # the test failed before the kill
            family += [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
            driver.kill()
        kill_leftovers(family, grace=5)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    trials = trials_by_id(read_evals(run_dir).to_pylist())
    assert len(trials) == 2
    for trial, rows in trials.items():
        assert [r["epoch"] for r in rows] == [1, 2], trial  # complete, no duplicates
        assert [r["status"] for r in rows] == ["running", "ok"], trial
        assert sorted(file_times(samples, trial)) == [f"{trial}-e0001.parquet", f"{trial}-e0002.parquet"]
    assert finished and set(finished) < set(trials)
    for trial, (eval_times, sample_times) in before.items():  # finished trials were not re-run
        assert file_times(evals, trial) == eval_times and len(eval_times) == 2
        assert file_times(samples, trial) == sample_times
    # The unfinished trial continued from its registered epoch-1 checkpoint: epoch 1 was not redone. (Its
    # epoch 2 may have been written just before the kill, ahead of its checkpoint; the resume then writes
    # it again under the same name, so the table still holds one row for it.)
    unfinished_after = file_times(evals, unfinished)
    assert unfinished_after[f"{unfinished}-e0001.parquet"] == unfinished_before[f"{unfinished}-e0001.parquet"]
    assert (run_dir / "ranking.parquet").exists()
