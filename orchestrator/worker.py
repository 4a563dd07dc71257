"""The worker: one process of a gang, under Ray Train or plain torchrun. Three jobs, chosen by the caller
with the config's ``job`` key:

- ``unlearn`` (``run_trial``): a method's epochs on the forget split, evaluated every k epochs (sharded
  over the gang, gathered on rank 0), each evaluation a row of the evals table, each epoch reported with
  a checkpoint;
- ``finetune`` (``run_finetune``): prepare's fine-tune of a reference model on some splits, saved as a
  ``from_pretrained`` directory;
- ``evaluate`` (``run_reference_evaluation``): prepare's one evaluation of a reference model, written as
  JSON (metrics, and the statistics a retain model lends later runs).

Each is built from the same steps: inputs (tokenizer, data) → models → engine → epochs (steps.py) →
evaluation → report (trial_report.py). Ray appears only in ``train_loop_per_worker`` at the bottom;
everything else takes rank, world size and a reporting callback, so it runs under torchrun or in a test.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from methods import build_method
from methods.base import MethodInputs, UnlearningMethod, nll
from orchestrator.steps import EpochStats, gather_epoch, run_epoch, trainable_parameters
from orchestrator.trial_report import emit_epoch
from orchestrator.zero import build_engine, frozen_copy, save_consolidated, whole_weights


@dataclass
class WorkerContext:
    """What a job needs from its launcher (Ray Train or torchrun)."""

    rank: int
    world_size: int
    device: torch.device
    report: Callable[[dict[str, Any], str | None], None]  # (metrics, local checkpoint dir or None)
    restore_dir: str | None = None  # checkpoint to resume from, already local
    local_rank: int = 0
    checkpoints: bool = True  # save one per epoch for the launcher (torchrun has nowhere to keep them)


class FineTune(UnlearningMethod):
    """Plain NLL on the training rows: how prepare fine-tunes the target and retain models (not registered)."""

    name = "finetune"
    splits = ("forget",)

    def objectives(self, inputs: MethodInputs) -> dict[str, torch.Tensor]:
        return {"nll": nll(inputs.policy["forget"])}


@dataclass
class Loop:
    """A module ready to train: its DeepSpeed engine and the data that feeds it."""

    engine: Any
    parameters: list[torch.nn.Parameter]
    dataset: Any
    sampler: Any
    loader: Any
    autocast: torch.dtype | None = None  # training.autocast: the dtype of the training forwards


# ---------------------------------------------------------------- shared steps
def start_process(ctx: WorkerContext, seed: int) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if ctx.device.type == "cuda" else "cpu")
    os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))  # DeepSpeed insists on it, whatever the launcher
    import deepspeed

    if ctx.device.type == "cpu":
        # DeepSpeed's shared-memory CPU collectives JIT-compile a C++ op (minutes on 2 cores) on first use;
        # gloo needs none of it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.manual_seed(seed)


def load_inputs(config: dict[str, Any]):
    """The tokenizer and the benchmark's rows by split."""
    from orchestrator.data import load_benchmark
    from orchestrator.models import load_tokenizer

    model_cfg, bench = config["model"], config["benchmark"]
    tokenizer = load_tokenizer(model_cfg["tokenizer"] or model_cfg["path"], model_cfg["trust_remote_code"])
    return tokenizer, load_benchmark(bench["source"], **bench.get("generator", {}))


def ensure_registered(name: str, cls: type | None) -> None:
    """Register a method class that came with the trial config (defined in a user's tuning script)."""
    from methods import method_names, register_method

    if cls is not None and name not in method_names():
        register_method(name)(cls)


def build_trained_module(config: dict[str, Any], ctx: WorkerContext, method: UnlearningMethod):
    """What the trial trains and what it runs frozen: (module, frozen reference or None, ULD's target or None)."""
    from orchestrator.models import apply_lora, load_model

    model_cfg, train_cfg = config["model"], config["training"]
    stage = int(config["scaling"]["zero_stage"])
    target = None
    if method.trains == "assistant":
        from orchestrator.uld import assistant_layer_count, build_assistant

        target = frozen_copy(model_cfg["path"], model_cfg, stage, ctx.world_size, ctx.device)
        base = load_model(model_cfg["path"], model_cfg["dtype"], model_cfg["trust_remote_code"])
        p = method.params
        layers = assistant_layer_count(base.config.num_hidden_layers, p.assistant_layers)
        module = build_assistant(base, layers, p.lora_rank, p.lora_alpha, p.lora_dropout)
        del base
    else:
        module = load_model(model_cfg["path"], model_cfg["dtype"], model_cfg["trust_remote_code"])
        lora = train_cfg.get("lora")
        if lora:
            module = apply_lora(module, lora["rank"], lora["alpha"], lora["dropout"], lora["target_modules"])
    if train_cfg["gradient_checkpointing"]:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(module, "enable_input_require_grads"):
            module.enable_input_require_grads()
    reference = None
    if method.uses_reference():
        # Under LoRA the frozen reference is the same base weights with the adapters switched off.
        reference = (AdaptersOff(module) if train_cfg.get("lora")
                     else frozen_copy(model_cfg["path"], model_cfg, stage, ctx.world_size, ctx.device))
    return module, reference, target


class AdaptersOff:
    """A LoRA model's base as a frozen reference: its own weights with the adapters disabled (peft), so the
    reference costs no second copy of the model. Called like a module, under no_grad by the step."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, **inputs):
        with self.model.disable_adapter():
            return self.model(**inputs)


def build_loop(config: dict[str, Any], ctx: WorkerContext, method: UnlearningMethod, module, rows, tokenizer) -> Loop:
    """The method's Dataset over ``rows`` (forget / retain), sharded over the gang, and the engine."""
    from torch.utils.data import DataLoader, DistributedSampler

    from orchestrator.data.training import UnlearningDataset, collate_splits
    from orchestrator.encoding import pad_id
    from orchestrator.models import DTYPES

    model_cfg, train_cfg, seed = config["model"], config["training"], int(config["seed"])
    dataset = UnlearningDataset(rows, method.splits, tokenizer, model_cfg["prompt_template"], train_cfg["max_length"], seed)
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=train_cfg["batch_size"], sampler=sampler,
                        collate_fn=lambda items: collate_splits(items, pad_id(tokenizer)))
    parameters = trainable_parameters(module, method)
    steps_per_epoch = math.ceil(len(loader) / train_cfg["grad_accum"])
    engine, parameters = build_engine(module, parameters, train_cfg, config["scaling"], model_cfg["dtype"],
                                      ctx.world_size, ctx.device, steps_per_epoch)
    autocast = DTYPES[train_cfg["autocast"]] if train_cfg.get("autocast") else None
    return Loop(engine, parameters, dataset, sampler, loader, autocast)


def train_epochs(loop: Loop, method: UnlearningMethod, reference, ctx: WorkerContext, epochs: int,
                 first_epoch: int = 1) -> Iterator[tuple[int, EpochStats]]:
    """Run epochs first_epoch..epochs, yielding each one's gang-wide stats; stop after a diverged one."""
    for epoch in range(first_epoch, epochs + 1):
        loop.sampler.set_epoch(epoch)
        loop.dataset.set_epoch(epoch)  # template answers re-drawn per epoch, reproducibly
        stats = gather_epoch(run_epoch(loop.engine, reference, method, loop.loader, loop.parameters, ctx.device,
                                       epoch, loop.autocast), ctx.world_size)
        yield epoch, stats
        if stats.diverged:
            return


def evaluate_scorer(config: dict[str, Any], ctx: WorkerContext, scorer, engines: list, tokenizer, data):
    """The whole suite on ``scorer``, sharded over the gang; ``engines``: ZeRO-3 engines whose weights are
    gathered once for it. Returns (EvalResult, seconds)."""
    from orchestrator.evaluation.suite import ReferenceStats, evaluate

    start = time.perf_counter()
    refs, bench = config["references"], config["benchmark"]
    retain_reference = None
    if refs.get("retain_stats"):  # the retain model's reference evaluation (prepare writes it)
        retain_reference = ReferenceStats.from_json(Path(refs["retain_stats"]).read_text())
    zero3 = int(config["scaling"]["zero_stage"]) == 3
    gather = config["evaluation"].get("gather_weights", True)
    settings = eval_config(config)
    if zero3 and not gather:  # partitioned weights: no whole gradient to take a norm of
        settings = replace(settings, gradnorm=False)
    with torch.no_grad(), whole_weights(engines if zero3 and gather else []):
        result = evaluate(
            scorer, tokenizer, data, settings, forget_split=bench["forget_split"],
            retain_split=bench["retain_split"], holdout_split=bench["holdout_split"],
            retain_reference=retain_reference, target_model_utility=refs.get("target_model_utility"),
            rank=ctx.rank, world_size=ctx.world_size,
        )
    return result, time.perf_counter() - start


def eval_config(config: dict[str, Any]):
    from orchestrator.evaluation.suite import EvalConfig

    options = {k: v for k, v in config["evaluation"].items() if k not in ("every", "gather_weights")}
    return EvalConfig(template=config["model"]["prompt_template"], **options)


def should_evaluate(epoch: int, epochs: int, every: int) -> bool:
    return epoch == epochs or (every > 0 and epoch % every == 0)


# ---------------------------------------------------------------- the three jobs
def run_trial(config: dict[str, Any], ctx: WorkerContext) -> dict[str, Any]:
    """One unlearning trial on this process's shard; returns rank 0's last evaluated row."""
    start_process(ctx, int(config["seed"]))
    tokenizer, data = load_inputs(config)
    ensure_registered(config["method"], config.get("method_class"))
    method = build_method(config["method"], **config["params"])
    bench = config["benchmark"]
    module, reference, target = build_trained_module(config, ctx, method)
    loop = build_loop(config, ctx, method, module, {"forget": data[bench["forget_split"]],
                                                    "retain": data[bench["retain_split"]]}, tokenizer)
    first_epoch, history = 1, []
    if ctx.restore_dir:
        _, client_state = loop.engine.load_checkpoint(ctx.restore_dir, tag="ckpt")
        first_epoch, history = int(client_state["epoch"]) + 1, client_state.get("history", [])
        method.load_state(client_state.get("method_state", {}))

    last: dict[str, Any] = history[-1] if history else {}
    train_seconds = history[-1].get("train_seconds", 0.0) if history else 0.0  # cumulative
    tokens = sum(h.get("epoch_tokens", 0) for h in history)
    epochs, every = int(config["training"]["epochs"]), config["evaluation"]["every"]
    for epoch, stats in train_epochs(loop, method, reference, ctx, epochs, first_epoch):
        train_seconds += stats.seconds
        tokens += stats.tokens
        if stats.diverged:
            row = {"status": "diverged", "epoch": epoch, "step": loop.engine.global_steps,
                   "train_seconds": train_seconds, "tokens": tokens, "not_measured": diverged_reasons(epoch)}
            emit_epoch(config, ctx, row, stats, samples=None, engine=None)
            return row
        metrics, samples, eval_seconds = {}, None, 0.0
        if should_evaluate(epoch, epochs, every):
            loop.engine.eval()
            engines = [loop.engine] + ([target.zero3_engine] if hasattr(target, "zero3_engine") else [])
            result, eval_seconds = evaluate_scorer(config, ctx, trial_scorer(loop.engine, target, method), engines,
                                                   tokenizer, data)
            loop.engine.train()
            metrics = dict(result.metrics, not_measured=json.dumps(result.not_measured, sort_keys=True))
            samples = result.samples
        row = {"status": "ok" if epoch == epochs else "running", "epoch": epoch,
               "step": loop.engine.global_steps, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
               "tokens": tokens, "epoch_tokens": stats.tokens, **metrics}
        if metrics or epoch == epochs:
            last = row
        history.append({k: row[k] for k in ("train_seconds", "epoch_tokens")} | metrics)
        emit_epoch(config, ctx, row, stats, samples, loop.engine, history=history, method_state=method.state())
    return last


def diverged_reasons(epoch: int) -> str:
    """The not_measured of a diverged epoch: a model with non-finite weights or logits cannot be scored."""
    from orchestrator.results import METRIC_COLUMNS

    reason = f"the trial diverged in epoch {epoch} (non-finite loss or logits): its model cannot be scored"
    return json.dumps({metric: reason for metric in METRIC_COLUMNS}, sort_keys=True)


def trial_scorer(engine, target, method: UnlearningMethod):
    """What evaluation scores: the trained model, or ULD's target − α·assistant composite."""
    from orchestrator.evaluation.scorer import ModelScorer

    if method.trains == "assistant":
        from orchestrator.uld import LogitDifferenceScorer

        return LogitDifferenceScorer(target, engine.module, method.params.alpha, method.params.filter_rate)
    return ModelScorer(engine.module)


def run_finetune(config: dict[str, Any], ctx: WorkerContext) -> dict[str, Any]:
    """Fine-tune a reference model on ``train_splits`` (plain NLL) and save it to ``save_to``."""
    from orchestrator.data.training import training_rows
    from orchestrator.models import load_model
    from orchestrator.trial_report import progress_line

    start_process(ctx, int(config["seed"]))
    tokenizer, data = load_inputs(config)
    method = FineTune(None)
    rows = training_rows(data, config["train_splits"], config.get("paraphrase_augmentation", False))
    model_cfg = config["model"]
    module = load_model(model_cfg["path"], model_cfg["dtype"], model_cfg["trust_remote_code"])
    loop = build_loop(config, ctx, method, module, {"forget": rows, "retain": rows}, tokenizer)
    epochs, seconds, tokens = int(config["training"]["epochs"]), 0.0, 0
    for epoch, stats in train_epochs(loop, method, None, ctx, epochs):
        if stats.diverged:
            raise RuntimeError(f"prepare: fine-tuning {config.get('label', 'a reference model')} diverged at epoch "
                               f"{epoch}; lower prepare.lr")
        seconds, tokens = seconds + stats.seconds, tokens + stats.tokens
        row = {"status": "ok" if epoch == epochs else "running", "epoch": epoch, "step": loop.engine.global_steps,
               "train_seconds": seconds, "tokens": tokens}
        if ctx.rank == 0:
            print(progress_line(config, row, stats), flush=True)
    save_consolidated(loop.engine, tokenizer, config["save_to"], ctx.rank, int(config["scaling"]["zero_stage"]))
    ctx.report(row, None)
    return row


def run_reference_evaluation(config: dict[str, Any], ctx: WorkerContext) -> dict[str, Any]:
    """Evaluate a reference model once and write ``eval_out``: its metrics (with why any is missing) and
    its ReferenceStats (what it lends later runs as their retain model)."""
    from orchestrator.evaluation.scorer import ModelScorer
    from orchestrator.results import write_reference_samples

    start_process(ctx, int(config["seed"]))
    tokenizer, data = load_inputs(config)
    model = frozen_copy(config["model"]["path"], config["model"], int(config["scaling"]["zero_stage"]),
                        ctx.world_size, ctx.device)
    engines = [model.zero3_engine] if hasattr(model, "zero3_engine") else []
    result, seconds = evaluate_scorer(config, ctx, ModelScorer(model), engines, tokenizer, data)
    if ctx.rank != 0:
        return {}
    metrics = dict(result.metrics, eval_seconds=seconds, not_measured=result.not_measured)
    out = Path(config["eval_out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"metrics": metrics, "reference": json.loads(result.reference.to_json())}))
    write_reference_samples(out, result.samples)  # first: the JSON's presence marks a finished evaluation
    os.replace(tmp, out)
    return metrics


JOBS: dict[str, Callable[[dict[str, Any], WorkerContext], dict[str, Any]]] = {
    "unlearn": run_trial, "finetune": run_finetune, "evaluate": run_reference_evaluation,
}


def run_job(config: dict[str, Any], ctx: WorkerContext) -> dict[str, Any]:
    """The job the config names (its ``job`` key: one of JOBS)."""
    if config.get("job") not in JOBS:
        raise ValueError(f"worker config: job {config.get('job')!r} is not one of {', '.join(JOBS)}")
    return JOBS[config["job"]](config, ctx)


# ---------------------------------------------------------------- Ray Train edge
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point for ``TorchTrainer``: builds the context from Ray Train and runs the job(s)."""
    import ray.train

    context = ray.train.get_context()
    tasks = config.get("tasks", [config])  # prepare sends several (fine-tune, evaluate) to one gang
    torch.set_num_threads(int(tasks[0].get("threads_per_worker", 1)))
    device = ray.train.torch.get_device() if tasks[0]["scaling"]["use_gpu"] else torch.device("cpu")
    checkpoint = ray.train.get_checkpoint()

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    with (checkpoint.as_directory() if checkpoint else nullcontext()) as restore_dir:
        ctx = WorkerContext(context.get_world_rank(), context.get_world_size(), device, report, restore_dir,
                            context.get_local_rank())
        for task in tasks:
            run_job(task, ctx)
            if torch.distributed.is_initialized():
                torch.distributed.barrier()  # a task's files (saved model, evaluation) exist before the next


def main() -> None:
    """torchrun entry: ``torchrun --nproc-per-node N -m orchestrator.worker CONFIG.json``."""
    import sys

    config = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(int(config.get("threads_per_worker", 1)))
    use_gpu = torch.cuda.is_available() and config["scaling"]["use_gpu"]
    torch.distributed.init_process_group("nccl" if use_gpu else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if rank == 0:
            if use_gpu:  # orchestrator.gpu_check reads it
                metrics = dict(metrics, peak_memory_bytes=torch.cuda.max_memory_allocated(device))
            print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, float) or math.isfinite(v)}), flush=True)

    run_job(config, WorkerContext(rank, world, device, report, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                                  checkpoints=False))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
