"""The worker loop: one process of a trial's gang, under Ray Train or plain torchrun.

setup (data, models, DeepSpeed) → epochs of steps (method objectives → update) → per-epoch evaluation
(sharded over the gang, gathered on rank 0) → report (metrics + checkpoint) → cleanup.
Ray appears only in ``train_loop_per_worker`` at the bottom; everything else takes rank, world size and
a reporting callback as arguments, so the loop runs under torchrun or in a test unchanged.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from methods import build_method
from methods.base import MethodInputs, ModelOutput, UnlearningMethod, nll

DIVERGED_SCORE = -1e9  # what a diverged trial reports to Tune, so schedulers rank it last


@dataclass
class WorkerContext:
    """What the loop needs from its launcher (Ray Train or torchrun)."""

    rank: int
    world_size: int
    device: torch.device
    report: Callable[[dict[str, Any], str | None], None]  # (metrics, local checkpoint dir or None)
    restore_dir: str | None = None  # checkpoint to resume from, already local
    local_rank: int = 0
    checkpoints: bool = True  # save one per epoch for the launcher (torchrun has nowhere to keep them)


@dataclass
class EpochStats:
    losses: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    diverged: bool = False


class FineTune(UnlearningMethod):
    """Plain NLL on the training rows: how prepare fine-tunes the target and retain models (not registered)."""

    name = "finetune"
    splits = ("forget",)

    def objectives(self, inputs: MethodInputs) -> dict[str, torch.Tensor]:
        return {"nll": nll(inputs.policy["forget"])}


# ---------------------------------------------------------------- setup helpers
def ensure_registered(name: str, cls: type | None) -> None:
    """Register a method class that came with the trial config (defined in a user's tuning script)."""
    from methods import method_names, register_method

    if cls is not None and name not in method_names():
        register_method(name)(cls)


def training_rows(data: dict[str, list[dict]], splits: list[str], paraphrases: bool) -> list[dict]:
    """Fine-tuning rows; with ``paraphrases`` each row also as (question → paraphrased answer)."""
    rows = [row for split in splits for row in data[split]]
    if paraphrases:
        rows += [dict(row, answer=row["paraphrased_answer"]) for row in rows if row.get("paraphrased_answer")]
    return rows



def deepspeed_config(stage: int, micro_batch: int, grad_accum: int, world_size: int, dtype: str,
                     offload: bool, max_grad_norm: float) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if offload:
        zero["offload_param"] = {"device": "cpu"}
        zero["offload_optimizer"] = {"device": "cpu"}
    # Offload otherwise insists on DeepSpeed's own (JIT-compiled) CPU Adam.
    force_ds_optimizer = {"zero_force_ds_cpu_optimizer": False} if offload else {}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "zero_optimization": zero,
        # A torch optimizer: DeepSpeed's fused CPU Adam JIT-compiles C++ for ~70 s on first use.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        **force_ds_optimizer,
    }
    if max_grad_norm > 0:
        config["gradient_clipping"] = max_grad_norm
    if dtype == "bfloat16":
        config["bf16"] = {"enabled": True}
    elif dtype == "float16":
        config["fp16"] = {"enabled": True}
    return config


def frozen_copy(reference: str, model_cfg: dict, stage: int, world_size: int, device: torch.device):
    """A frozen model for reference outputs or ULD's target. Under ZeRO-3 it is partitioned across the
    gang by a DeepSpeed engine without optimizer, so no worker holds a full copy after setup."""
    from orchestrator.models import load_model

    model = load_model(reference, model_cfg["dtype"], model_cfg["trust_remote_code"])
    model.requires_grad_(False)
    model.eval()
    if stage != 3:
        return model.to(device)
    import deepspeed

    config = deepspeed_config(3, 1, 1, world_size, model_cfg["dtype"], False, 0.0)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.module.eval()
    # Beside the module's attributes, not a submodule: evaluation gathers the weights through the engine.
    engine.module.__dict__["zero3_engine"] = engine
    return engine.module


@contextmanager
def whole_weights(engines: list) -> Any:
    """ZeRO-3 evaluation: each engine's weights gathered once and its per-layer gather hooks lifted
    (DeepSpeed's unwrap_model_for_generation), so a generated token costs no all-gather; re-partitioned
    and hooked again on exit. Every rank holds a full copy of each model meanwhile."""
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    with ExitStack() as stack:
        for engine in engines:
            stack.enter_context(unwrap_model_for_generation(engine))
        yield


def trainable_parameters(module: torch.nn.Module, method: UnlearningMethod) -> list[torch.nn.Parameter]:
    """Freeze what the method leaves alone (RMU trains only chosen modules); return what is trained."""
    chosen = []
    for name, parameter in module.named_parameters():
        if parameter.requires_grad and not method.trainable(name):
            parameter.requires_grad_(False)
        if parameter.requires_grad:
            chosen.append(parameter)
    if not chosen:
        raise ValueError(f"method {method.name!r} selects no trainable parameter")
    return chosen


def warmup_then_linear_decay(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max(1, total_steps - warmup_steps)
        return max(0.0, 1.0 - (step - warmup_steps) / remaining)

    return factor


def forward(module, batch: dict[str, torch.Tensor], hidden_layer: int | None) -> ModelOutput:
    out = module(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        output_hidden_states=hidden_layer is not None, use_cache=False,
    )
    hidden = out.hidden_states[hidden_layer] if hidden_layer is not None else None
    return ModelOutput(out.logits, batch["labels"], batch["attention_mask"], hidden)


def method_inputs(engine, reference, method: UnlearningMethod, batches: dict[str, dict]) -> MethodInputs:
    layer = method.hidden_layer
    policy = {split: forward(engine, batches[split], layer) for split in method.splits}
    ref = {}
    if reference is not None:
        with torch.no_grad():
            ref = {split: forward(reference, batches[split], layer) for split in method.reference_splits}
    return MethodInputs(policy=policy, reference=ref)


def to_device(batches: dict[str, dict[str, torch.Tensor]], device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    return {split: {k: v.to(device, non_blocking=True) for k, v in batch.items()} for split, batch in batches.items()}


# ---------------------------------------------------------------- one step, one epoch
def update(engine, method: UnlearningMethod, objectives: dict[str, torch.Tensor],
           parameters: list[torch.nn.Parameter]) -> dict[str, float]:
    """Turn objectives into one optimizer step: a sum, or the min-norm common descent direction (whose
    per-objective weights are returned)."""
    weights: dict[str, float] = {}
    if method.combine == "mgda":
        from orchestrator.multiobjective import common_descent_backward

        weights = common_descent_backward(
            objectives, parameters, engine.backward, normalize=getattr(method.params, "normalize_gradients", False)
        )
    else:
        engine.backward(sum(objectives.values()))
    engine.step()
    return weights


def produces_finite_logits(engine, batches: dict[str, dict[str, torch.Tensor]]) -> bool:
    """One no-grad forward of the updated model on the epoch's last batch. Each loss is computed before
    its update, so the epoch's last update is unchecked: lr 1e6 leaves weights finite but so large that
    the next forward overflows, and evaluation cannot score such a model. Every rank runs it (ZeRO-3's
    forward gathers parameters collectively)."""
    with torch.no_grad():
        logits = forward(engine, next(iter(batches.values())), None).logits
    return bool(torch.isfinite(logits).all())


def all_ranks_finite(values, device: torch.device) -> bool:
    """Whether every value is finite on every rank. Agreed before each update: a rank that stopped alone
    would leave the others blocked in the gradient all-reduce (one scalar all-reduce per step)."""
    finite = all(bool(torch.isfinite(value).all()) for value in values)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        flag = torch.tensor([0.0 if finite else 1.0], device=device)
        torch.distributed.all_reduce(flag)
        finite = float(flag) == 0.0
    return finite


def run_epoch(engine, reference, method, loader, parameters, device) -> EpochStats:
    stats = EpochStats()
    start = time.perf_counter()
    sums: dict[str, float] = {}
    weight_sums: dict[str, float] = {}
    engine.train()
    for batches in loader:
        batches = to_device(batches, device)
        objectives = method.objectives(method_inputs(engine, reference, method, batches))
        if not all_ranks_finite(objectives.values(), device):
            stats.diverged = True
            break
        weights = update(engine, method, objectives, parameters)
        for name, value in objectives.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        for name, value in weights.items():
            weight_sums[name] = weight_sums.get(name, 0.0) + value
        stats.steps += 1
        stats.tokens += int(sum(int(b["attention_mask"].sum()) for b in batches.values()))
    if stats.steps and not stats.diverged and not produces_finite_logits(engine, batches):
        stats.diverged = True
    stats.seconds = time.perf_counter() - start
    steps = max(1, stats.steps)
    stats.losses = {name: value / steps for name, value in sums.items()}
    stats.weights = {name: value / steps for name, value in weight_sums.items()}
    return stats


# ---------------------------------------------------------------- the loop
def run_worker(config: dict[str, Any], ctx: WorkerContext) -> dict[str, Any]:
    """Train one trial (or fine-tune a reference model) on this process's shard; return rank 0's last metrics."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if ctx.device.type == "cuda" else "cpu")
    os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))  # DeepSpeed insists on it, whatever the launcher
    import deepspeed
    from torch.utils.data import DataLoader, DistributedSampler

    if ctx.device.type == "cpu":
        # DeepSpeed's shared-memory CPU collectives JIT-compile a C++ op (minutes on 2 cores) on first use;
        # gloo needs none of it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    from orchestrator.data import UnlearningDataset, collate_splits, load_benchmark
    from orchestrator.encoding import pad_id
    from orchestrator.models import apply_lora, load_model, load_tokenizer

    # -- setup: data, method, models, DeepSpeed
    seed = int(config["seed"])
    torch.manual_seed(seed)
    model_cfg, train_cfg, scale_cfg = config["model"], config["training"], config["scaling"]
    bench_cfg = config["benchmark"]
    tokenizer = load_tokenizer(model_cfg["tokenizer"] or model_cfg["path"], model_cfg["trust_remote_code"])
    data = load_benchmark(bench_cfg["source"], **bench_cfg.get("generator", {}))
    if config["mode"] == "finetune":
        method: UnlearningMethod = FineTune(None)
        # With no training splits (evaluation only) the dataset is built but never iterated.
        forget_rows = training_rows(data, config["train_splits"], config.get("paraphrase_augmentation", False)) \
            or data[bench_cfg["forget_split"]]
        retain_rows = forget_rows
    else:
        ensure_registered(config["method"], config.get("method_class"))
        method = build_method(config["method"], **config["params"])
        forget_rows, retain_rows = data[bench_cfg["forget_split"]], data[bench_cfg["retain_split"]]
    dataset = UnlearningDataset({"forget": forget_rows, "retain": retain_rows}, method.splits, tokenizer,
                                model_cfg["prompt_template"], train_cfg["max_length"], seed)
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=train_cfg["batch_size"], sampler=sampler,
                        collate_fn=lambda items: collate_splits(items, pad_id(tokenizer)))

    stage = int(scale_cfg["zero_stage"])
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
    parameters = trainable_parameters(module, method)
    reference = (frozen_copy(model_cfg["path"], model_cfg, stage, ctx.world_size, ctx.device)
                 if method.reference_splits else None)

    epochs = int(train_cfg["epochs"])
    steps_per_epoch = math.ceil(len(loader) / train_cfg["grad_accum"])
    # Fused AdamW: one CUDA kernel for all parameters; with offload the optimizer step runs on the CPU.
    fused = ctx.device.type == "cuda" and not scale_cfg["offload"]
    optimizer = torch.optim.AdamW(parameters, lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"],
                                  fused=fused or None)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear_decay(
        steps_per_epoch * epochs, int(steps_per_epoch * train_cfg["warmup_epochs"])))
    ds_config = deepspeed_config(stage, train_cfg["batch_size"], train_cfg["grad_accum"], ctx.world_size,
                                 model_cfg["dtype"], scale_cfg["offload"], train_cfg["max_grad_norm"])
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule,
                                           config=ds_config, model_parameters=parameters)
    parameters = [p for p in engine.module.parameters() if p.requires_grad]

    first_epoch = 1
    history: list[dict[str, Any]] = []
    if ctx.restore_dir:
        _, client_state = engine.load_checkpoint(ctx.restore_dir, tag="ckpt")
        first_epoch = int(client_state["epoch"]) + 1
        history = client_state.get("history", [])

    # -- epochs: steps, then evaluation and report
    last: dict[str, Any] = history[-1] if history else {}
    train_seconds = history[-1].get("train_seconds", 0.0) if history else 0.0  # cumulative
    tokens = sum(h.get("epoch_tokens", 0) for h in history)
    for epoch in range(first_epoch, epochs + 1):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)  # template answers re-drawn per epoch, reproducibly
        stats = run_epoch(engine, reference, method, loader, parameters, ctx.device)
        stats = _gather_epoch(stats, ctx)
        train_seconds += stats.seconds
        tokens += stats.tokens
        if stats.diverged:
            row = dict(last, status="diverged", epoch=epoch, score=DIVERGED_SCORE)
            _emit(config, ctx, row, stats, samples=None, engine=None)
            return row
        evaluate_now = config["mode"] == "unlearn" and _should_evaluate(epoch, epochs, config["evaluation"]["every"])
        metrics, samples, eval_seconds = ({}, None, 0.0)
        if evaluate_now:
            result, eval_seconds = _evaluate(config, ctx, engine, target, method, tokenizer, data)
            metrics, samples = result.metrics, result.samples
        row = {"status": "ok" if epoch == epochs else "running", "epoch": epoch,
               "step": engine.global_steps, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
               "tokens": tokens, "epoch_tokens": stats.tokens, **metrics}
        if metrics or epoch == epochs:
            last = row
        history.append({k: row[k] for k in ("train_seconds", "epoch_tokens")} | metrics)
        _emit(config, ctx, row, stats, samples, engine, history=history)

    # -- cleanup: a fine-tuned reference model is saved, or evaluated once for prepare
    if config["mode"] == "finetune" and config.get("save_to"):
        _save_finetuned(engine, tokenizer, config["save_to"], ctx, stage)
    if config["mode"] == "finetune" and config.get("eval_out"):
        _write_reference_evaluation(config, ctx, engine, method, tokenizer, data)
    return last


def _should_evaluate(epoch: int, epochs: int, every: int) -> bool:
    return epoch == epochs or (every > 0 and epoch % every == 0)


def _gather_epoch(stats: EpochStats, ctx: WorkerContext) -> EpochStats:
    """Agree on divergence across the gang (one rank's NaN stops all) and sum tokens."""
    if ctx.world_size == 1 or not torch.distributed.is_initialized():
        return stats
    flags = torch.tensor([float(stats.diverged), float(stats.tokens)])
    torch.distributed.all_reduce(flags)
    stats.diverged = bool(flags[0] > 0)
    stats.tokens = int(flags[1])
    return stats


def _evaluate(config, ctx, engine, target, method, tokenizer, data):
    from orchestrator.evaluation.scorer import ModelScorer
    from orchestrator.evaluation.suite import ReferenceStats, evaluate

    start = time.perf_counter()
    engine.eval()
    if method.trains == "assistant":
        from orchestrator.uld import LogitDifferenceScorer

        scorer = LogitDifferenceScorer(target, engine.module, method.params.alpha, method.params.filter_rate)
    else:
        scorer = ModelScorer(engine.module)
    refs = config["references"]
    retain_reference = None
    if refs.get("retain_stats"):  # the retain model's reference evaluation (prepare writes it)
        retain_reference = ReferenceStats.from_json(json.dumps(json.loads(Path(refs["retain_stats"]).read_text())["reference"]))
    gathered = []
    if int(config["scaling"]["zero_stage"]) == 3 and config["evaluation"].get("gather_weights", True):
        gathered = [engine] + ([target.zero3_engine] if hasattr(target, "zero3_engine") else [])
    with torch.no_grad(), whole_weights(gathered):
        result = evaluate(
            scorer, tokenizer, data, eval_config(config), forget_split=config["benchmark"]["forget_split"],
            retain_split=config["benchmark"]["retain_split"], holdout_split=config["benchmark"]["holdout_split"],
            retain_reference=retain_reference, target_model_utility=refs.get("target_model_utility"),
            rank=ctx.rank, world_size=ctx.world_size,
        )
    engine.train()
    return result, time.perf_counter() - start


def _write_reference_evaluation(config, ctx, engine, method, tokenizer, data) -> None:
    """Evaluate a reference model; without a retain reference it is its own (forget quality 1.0)."""
    from orchestrator.evaluation.metrics import forget_quality

    result, seconds = _evaluate(config, ctx, engine, None, method, tokenizer, data)
    if ctx.rank != 0:
        return
    metrics = dict(result.metrics, eval_seconds=seconds)
    if not config["references"].get("retain_stats"):
        own = result.reference.forget_truth_ratios  # empty on MUSE text: no truth ratio, no forget quality
        metrics.update(forget_quality=forget_quality(own, own) if own else None, privleak=0.0)
    out = Path(config["eval_out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"metrics": metrics, "reference": json.loads(result.reference.to_json())}))
    os.replace(tmp, out)


def eval_config(config: dict[str, Any]):
    from orchestrator.evaluation.suite import EvalConfig

    options = {k: v for k, v in config["evaluation"].items() if k not in ("every", "gather_weights")}
    return EvalConfig(template=config["model"]["prompt_template"], max_length=config["training"]["max_length"], **options)


def score(metrics: dict[str, Any], utility_weight: float, kind: str = "tofu") -> float | None:
    """The scalar a single-objective search optimises: log10 FQ minus a utility-loss penalty. MUSE has no
    forget quality: its forget term is −VerbMem (ROUGE-L F1 in [0, 1], lower is better)."""
    fq, loss = metrics.get("forget_quality"), metrics.get("utility_loss")
    if kind == "muse":
        verbmem = metrics.get("verbmem_forget")
        if verbmem is None or loss is None or not math.isfinite(verbmem) or not math.isfinite(loss):
            return None
        return -verbmem - utility_weight * max(0.0, loss)
    if fq is None or loss is None or not math.isfinite(fq) or not math.isfinite(loss):
        return None
    return math.log10(max(fq, 1e-300)) - utility_weight * max(0.0, loss)


def benchmark_kind(config: dict[str, Any]) -> str:
    """"tofu" or "muse", from the benchmark's load arguments (prepare.benchmark_config)."""
    return config["benchmark"].get("generator", {}).get("kind", "tofu")


def _emit(config, ctx, row, stats: EpochStats, samples, engine, history=None) -> None:
    """Rank 0 writes the evals row (and samples); every rank reports, with a checkpoint when it has one."""
    from orchestrator.results import write_evals, write_samples

    metrics = dict(row)
    for name, value in stats.losses.items():
        metrics[f"loss.{name}"] = value
    for name, value in stats.weights.items():  # MGDA: λ per objective ("weight.*": after normalisation)
        metrics[f"extra.{name}" if name.startswith("weight.") else f"extra.lambda.{name}"] = value
    if config["mode"] == "unlearn":
        value = (score(metrics, config["utility_weight"], benchmark_kind(config))
                 if metrics["status"] != "diverged" else DIVERGED_SCORE)
        metrics["score"] = DIVERGED_SCORE if value is None else value
        if metrics.get("forget_quality") is not None:
            metrics["log10_forget_quality"] = math.log10(max(metrics["forget_quality"], 1e-300))
    evaluated = any(k in row for k in ("forget_quality", "model_utility", "forget_prob")) or row["status"] == "diverged"
    if ctx.rank == 0 and config["mode"] == "unlearn" and (evaluated or row["status"] == "ok"):
        write_evals(config["run_dir"], [evals_row(config, ctx, metrics)], config["trial_id"], row["epoch"])
        if samples:
            write_samples(config["run_dir"], [dict(s, run_id=config["run_id"], trial_id=config["trial_id"],
                                                   epoch=row["epoch"]) for s in samples],
                          config["trial_id"], row["epoch"])
    if ctx.rank == 0:
        print(progress_line(config, row, stats), flush=True)
        if config["mode"] == "unlearn":  # live metrics for Grafana / the Ray dashboard; a no-op outside Ray
            from orchestrator.telemetry import TrialTelemetry
            TrialTelemetry(config["run_id"], config["trial_id"], config["method"]).epoch(stats, row)
    if config["mode"] == "finetune" and row["status"] != "ok":
        return  # fine-tuning reports once, at the end; progress goes to the log
    checkpoint_dir = None
    if engine is not None and config["mode"] == "unlearn" and ctx.checkpoints:
        checkpoint_dir = tempfile.mkdtemp(prefix="unlearn-ckpt-")
        engine.save_checkpoint(checkpoint_dir, tag="ckpt", client_state={"epoch": row["epoch"], "history": history})
    ctx.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}, checkpoint_dir)
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


def evals_row(config: dict[str, Any], ctx: WorkerContext, metrics: dict[str, Any]) -> dict[str, Any]:
    from orchestrator.results import EVALS_SCHEMA

    train = config["training"]
    row = {k: v for k, v in metrics.items() if k in EVALS_SCHEMA.names or k.startswith("extra.")}
    row.update(
        run_id=config["run_id"], trial_id=config["trial_id"], method=config["method"],
        params=json.dumps(config["trial_params"], sort_keys=True), num_workers=ctx.world_size,
        zero_stage=config["scaling"]["zero_stage"], per_worker_batch=train["batch_size"], grad_accum=train["grad_accum"],
        effective_batch=train["batch_size"] * train["grad_accum"] * ctx.world_size, seed=config["seed"],
        spec_hash=config["spec_hash"], git_sha=config["git_sha"], versions=config["versions"],
    )
    return row


def _save_finetuned(engine, tokenizer, directory: str, ctx: WorkerContext, stage: int) -> None:
    """Consolidate (ZeRO-3 gathers every shard) and save as a from_pretrained directory on rank 0."""
    import deepspeed

    module = engine.module
    context = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None) if stage == 3 else nullcontext()
    with context:
        if ctx.rank == 0:
            tmp = Path(directory).with_name(Path(directory).name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            module.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(tmp, directory)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---------------------------------------------------------------- Ray Train edge
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point for ``TorchTrainer``: builds the context from Ray Train and runs the loop."""
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
            run_worker(task, ctx)
            if torch.distributed.is_initialized():
                torch.distributed.barrier()  # a task's files (saved model, evaluation) exist before the next


def main() -> None:
    """torchrun entry: ``torchrun --nproc-per-node N -m orchestrator.worker CONFIG.json``."""
    import sys

    config = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(int(config.get("threads_per_worker", 1)))
    use_gpu = torch.cuda.is_available() and config["scaling"]["use_gpu"]
    backend = "nccl" if use_gpu else "gloo"
    torch.distributed.init_process_group(backend)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if rank == 0:
            if use_gpu:  # orchestrator.gpu_check reads it
                metrics = dict(metrics, peak_memory_bytes=torch.cuda.max_memory_allocated(device))
            print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, float) or math.isfinite(v)}), flush=True)

    run_worker(config, WorkerContext(rank, world, device, report, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                                     checkpoints=False))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
