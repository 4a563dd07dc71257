"""Running the worker loop for the bench as a 1-worker Ray Train trial (the plain-process side is
orchestrator/local_run.py), with when it entered the loop."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from orchestrator.local_run import ProcessRun


# ---------------------------------------------------------------- Ray
def timed_train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` unchanged, after noting when the gang reached it (for gang start)."""
    import ray.train

    from orchestrator.worker import train_loop_per_worker

    if ray.train.get_context().get_world_rank() == 0:
        Path(config["bench_marker"]).write_text(repr(time.time()))
    train_loop_per_worker(config)


def ray_trial(config: dict[str, Any], storage: Path, name: str) -> ProcessRun:
    """The worker loop as a 1-worker TorchTrainer; reports come from the checkpoints it registered."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    marker = storage / f"{name}.entered"
    cpus = config["scaling"]["cpus_per_worker"]
    trainer = TorchTrainer(
        timed_train_loop, train_loop_config=dict(config, bench_marker=str(marker)),
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=name, storage_path=str(storage)),
    )
    launched = time.time()
    result = trainer.fit()
    finished = time.time()
    reports = [metrics for _, metrics in (result.best_checkpoints or [])]
    return ProcessRun(launched, finished, [{"rank": 0, "entered": float(marker.read_text()), "reports": reports}])


def start_ray(temp_dir: Path) -> None:
    """A local cluster as the product starts one (its env defaults, the dashboard on, every process knowing
    its address: see ``api.start_local_ray``), quiet on stdout."""
    import ray

    from orchestrator.api import RAY_ENV_DEFAULTS, start_local_ray

    if ray.is_initialized():
        return
    for name, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    start_local_ray(os.cpu_count(), _temp_dir=str(temp_dir), log_to_driver=False)
