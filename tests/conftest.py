"""Shared fixtures: a real local Ray (2 CPUs), a tiny embedded job spec, and its prepared models.

Everything tools would write outside the project (Ray's temp dir, Tune results, DeepSpeed's op cache)
is pointed at temporary or project-local directories.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")

# The smallest job that exercises every layer: 20 authors × 3 questions, a 2-layer Llama with hidden 32.
TINY_SPEC = {
    "name": "tiny",
    "seed": 0,
    "benchmark": {"source": "embedded", "num_authors": 20, "questions_per_author": 3,
                  "forget_split": "forget10", "retain_split": "retain90", "holdout_split": "holdout10"},
    "model": {"target": "embedded", "embedded": {"vocab_size": 400, "hidden_size": 32, "num_layers": 2,
                                                 "num_heads": 2, "intermediate_size": 64}},
    # 12 epochs: enough for a target with model utility > 0 (at 4 it was 0, and utility loss undefined)
    "prepare": {"epochs": 12, "lr": 5e-3, "batch_size": 16},
    "training": {"lr": 1e-4, "epochs": 2, "batch_size": 4, "max_length": 64, "warmup_epochs": 0},
    "scaling": {"num_workers": 2, "cpus_per_worker": 0.99, "zero_stage": 2},
    "evaluation": {"max_new_tokens": 8, "batch_size": 16, "verbmem_new_tokens": 8, "knowmem_new_tokens": 8,
                   "verbmem_prefix_tokens": 8},
    "sweep": {"methods": [{"name": "ga", "space": {"lr": {"grid": [1e-4]}, "epochs": {"grid": [2]}}}]},
}


def tiny_spec(cache_dir: str | os.PathLike, **overrides) -> dict:
    """TINY_SPEC with the prepare cache at ``cache_dir`` and top-level sections replaced by ``overrides``."""
    spec = copy.deepcopy(TINY_SPEC)
    spec["prepare"]["cache_dir"] = str(cache_dir)
    for key, value in overrides.items():
        spec[key] = value
    return spec


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster with 2 CPUs, its temp dir under /tmp (socket paths must stay short).

    Started as `unlearn run` starts one, with its dashboard: Ray Train frees the gang of a trial that Tune
    stops (ASHA) through the dashboard's state API (orchestrator.api.start_local_ray says why)."""
    import ray

    from orchestrator.api import start_local_ray

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    start_local_ray(2, _temp_dir=temp_dir, log_to_driver=True)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One prepare cache shared by the integration tests (the first run trains, the others reuse)."""
    return tmp_path_factory.mktemp("unlearn-cache")


def deepspeed_reads(config: dict, world_size: int, monkeypatch: pytest.MonkeyPatch):
    """DeepSpeed's own parse of an engine config as rank 0 of a ``world_size``-rank gang, without a process
    group (the data-parallel size comes from an mpu object). It refuses a config whose train_batch_size is not
    micro batch × accumulation × world size."""
    import deepspeed.runtime.config as ds_config

    class DataParallel:
        def get_data_parallel_world_size(self) -> int:
            return world_size

    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *args, **kwargs: 0)
    return ds_config.DeepSpeedConfig(config, mpu=DataParallel())


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """One prepare cache for the tests on the real SmolLM2-135M-Instruct: its GGUF is converted once."""
    return tmp_path_factory.mktemp("smollm2-cache")
