"""The bench job and its two sizes (``--quick`` shrinks epochs and sweeps, not the code path), and what
every section shares."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class BenchSize:
    """What --quick shrinks; everything else is the same code path."""

    prepare_epochs: int  # fine-tuning epochs of the target/retain models (cached after the first run)
    throughput_epochs: int  # P1: epochs per side (the first is warm-up, the rest are repetitions)
    unlearn_epochs: int  # P2 and P5: epochs per trial
    eval_repeats: int  # P4: timed runs of the batched suite (seconds each)
    per_sample_repeats: int  # P4: timed runs of the one-at-a-time reference (~5× longer)
    lr_grid: tuple[float, ...]  # P5: the GA learning-rate grid
    optuna: bool  # P5: also an Optuna sweep (one more wave of trial start-ups)
    sweep_timeout: float  # P5: seconds a sweep may take before Ray is shut down under it
    memory_model: tuple[int, int]  # P6: (hidden size, layers)
    matmul_size: int  # P3: n of the n×n peak matmul


# Wall time is dominated by process and Ray gang start-ups (~30 s a trial on 2 cores), not by epochs.
FULL = BenchSize(prepare_epochs=10, throughput_epochs=8, unlearn_epochs=3, eval_repeats=3, per_sample_repeats=2,
                 lr_grid=(1e-5, 1e-4, 1e-3, 1e-2), optuna=True, sweep_timeout=420, memory_model=(384, 6),
                 matmul_size=2048)
QUICK = BenchSize(prepare_epochs=2, throughput_epochs=3, unlearn_epochs=2, eval_repeats=1, per_sample_repeats=1,
                  lr_grid=(1e-4, 1e-2), optuna=False, sweep_timeout=300, memory_model=(256, 4), matmul_size=1024)


def bench_spec(size: BenchSize, cache_dir: str, **sweep: Any) -> dict[str, Any]:
    """A small embedded job: 20 authors × 4 facts, a 4-layer Llama with hidden 64 (~0.2M parameters)
    that memorises its facts in ~1 min of prepare; every trial is one worker (two trials fit at once)."""
    return {
        "name": "bench", "seed": 0,
        "benchmark": {"source": "embedded", "num_authors": 20, "questions_per_author": 4,
                      "forget_split": "forget10", "retain_split": "retain90", "holdout_split": "holdout10"},
        "model": {"target": "embedded", "embedded": {"vocab_size": 512, "hidden_size": 64, "num_layers": 4,
                                                     "num_heads": 4, "intermediate_size": 128}},
        "prepare": {"epochs": size.prepare_epochs, "lr": 5e-3, "batch_size": 16, "cache_dir": cache_dir},
        "training": {"lr": 1e-4, "epochs": size.unlearn_epochs, "batch_size": 4, "max_length": 64,
                     "warmup_epochs": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.99, "zero_stage": 2},
        "evaluation": {"every": 1, "batch_size": 32, "max_new_tokens": 16, "verbmem_prefix_tokens": 8,
                       "verbmem_new_tokens": 16, "knowmem_new_tokens": 16},
        "sweep": sweep or {"methods": [{"name": "ga", "space": {"lr": {"grid": list(size.lr_grid)}}}]},
    }


@dataclass
class Bench:
    """What every section shares: the spec, the prepared models, a scratch directory, a logger."""

    size: BenchSize
    spec: Any  # JobSpec
    prepared: Any  # prepare.Prepared
    work: Path
    log: Callable[[str], None]

    def base_config(self) -> dict[str, Any]:
        from orchestrator.api import base_trial_config

        return base_trial_config(self.spec, self.work / "run", "bench", self.prepared)

    def trial_config(self, method: str, params: dict[str, Any], name: str, **training: Any) -> dict[str, Any]:
        base = self.base_config()
        return dict(base, job="unlearn", method=method, params=params, trial_id=name, trial_params=params,
                    run_dir=str(self.work / name), training={**base["training"], **training})
