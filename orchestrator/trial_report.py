"""What a trial's epoch leaves behind: the evals row (and samples) on rank 0, a progress line, the live
dashboard metrics, and the report to the launcher with a checkpoint.

Every rank reports (Ray Train gathers a checkpoint from each); only rank 0 writes result files.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from typing import Any

from orchestrator.scores import log10_forget_quality, score
from orchestrator.steps import EpochStats

DIVERGED_SCORE = -1e9  # what a diverged trial reports to Tune, so schedulers rank it last


def epoch_metrics(config: dict[str, Any], row: dict[str, Any], stats: EpochStats) -> dict[str, Any]:
    """The row plus per-objective losses, method extras and the numbers Tune searches on."""
    metrics = dict(row)
    for name, value in stats.losses.items():
        metrics[f"loss.{name}"] = value
    for name, value in stats.weights.items():  # MGDA: λ per objective ("weight.*": after normalisation)
        metrics[f"extra.{name}" if name.startswith("weight.") else f"extra.lambda.{name}"] = value
    for name, value in stats.extras.items():  # the method's own numbers (PDU: dual.lambda)
        metrics[f"extra.{name}"] = value
    # An epoch without a measured score reports none (Tune's schedulers skip such results): "not measured"
    # must not look like "diverged", which reports DIVERGED_SCORE so schedulers rank it last.
    value = (score(metrics, config["utility_weight"], config["benchmark"]["forget_axis"])
             if metrics["status"] != "diverged" else DIVERGED_SCORE)
    if value is not None:
        metrics["score"] = value
    if metrics.get("forget_quality") is not None:
        metrics["log10_forget_quality"] = log10_forget_quality(metrics["forget_quality"])
    return metrics


def emit_epoch(config: dict[str, Any], ctx, row: dict[str, Any], stats: EpochStats, samples, engine,
               history: list[dict[str, Any]] | None = None, method_state: dict[str, float] | None = None,
               before_report=None) -> None:
    """Write (rank 0), print, record and report one epoch of a trial, with a checkpoint when there is one."""
    from orchestrator.results import write_evals, write_samples

    metrics = epoch_metrics(config, row, stats)
    evaluated = any(k in row for k in ("forget_quality", "model_utility", "forget_prob")) or row["status"] == "diverged"
    if ctx.rank == 0 and (evaluated or row["status"] == "ok"):
        write_evals(config["run_dir"], [evals_row(config, ctx.world_size, metrics)], config["trial_id"], row["epoch"])
        if samples:
            write_samples(config["run_dir"], [dict(s, run_id=config["run_id"], trial_id=config["trial_id"],
                                                   epoch=row["epoch"]) for s in samples],
                          config["trial_id"], row["epoch"])
    if ctx.rank == 0:
        print(progress_line(config, row, stats), flush=True)
        from orchestrator.telemetry import TrialTelemetry  # live metrics for Grafana; a no-op outside Ray

        TrialTelemetry(config["run_id"], config["trial_id"], config["method"]).epoch(stats, row)
    checkpoint_dir = None
    if engine is not None and ctx.checkpoints:
        checkpoint_dir = tempfile.mkdtemp(prefix="unlearn-ckpt-")
        engine.save_checkpoint(checkpoint_dir, tag="ckpt", client_state={"epoch": row["epoch"], "history": history,
                                                                         "method_state": method_state or {}})
    if before_report is not None:  # the last epoch's probes: after its checkpoint is saved, before Tune may stop it
        before_report()
    ctx.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and k != "not_measured"},
               checkpoint_dir)
    if checkpoint_dir:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


def progress_line(config: dict[str, Any], row: dict[str, Any], stats: EpochStats) -> str:
    """One line per epoch for the job log (and the Ray dashboard's logs)."""
    who = config.get("trial_id") or f"prepare {config.get('label', '')}"
    losses = " ".join(f"{name} {value:.4g}" for name, value in stats.losses.items())
    speed = stats.tokens / stats.seconds if stats.seconds else 0.0
    line = f"[{who}] epoch {row['epoch']}/{config['training']['epochs']} {row['status']} {losses} ({speed:,.0f} tok/s)"
    if row.get("forget_quality") is not None:
        line += f" FQ {row['forget_quality']:.3g} MU {row.get('model_utility') or 0:.3f}"
    elif row.get("verbmem_forget") is not None:  # MUSE
        line += f" VerbMem {row['verbmem_forget']:.3f} KnowMem retain {row.get('knowmem_retain') or 0:.3f}"
    return line


def evals_row(config: dict[str, Any], world_size: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """The evals-table row of a trial epoch: its metrics with the trial's identity, cost and provenance."""
    from orchestrator.results import EVALS_SCHEMA

    train = config["training"]
    row = {k: v for k, v in metrics.items() if k in EVALS_SCHEMA.names or k.startswith("extra.")}
    row.update(
        benchmark=config["benchmark"]["kind"],
        truth_ratio_aggregator=config["evaluation"]["truth_ratio_aggregator"],
        run_id=config["run_id"], trial_id=config["trial_id"], method=config["method"],
        params=json.dumps(config["trial_params"], sort_keys=True), num_workers=world_size,
        zero_stage=config["scaling"]["zero_stage"], per_worker_batch=train["batch_size"], grad_accum=train["grad_accum"],
        effective_batch=train["batch_size"] * train["grad_accum"] * world_size, seed=config["seed"],
        spec_hash=config["spec_hash"], git_sha=config["git_sha"], versions=config["versions"],
    )
    return row
