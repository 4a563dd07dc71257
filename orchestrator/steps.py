"""One optimizer step and one epoch: forwards over a method's batches, its objectives, the update.

Everything takes the engine, method and batches as arguments (no Ray, no config dicts), so the same step
runs under Ray Train, torchrun and unit tests.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from methods.base import MethodInputs, ModelOutput, UnlearningMethod


@dataclass
class EpochStats:
    losses: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    diverged: bool = False
    extras: dict[str, float] = field(default_factory=dict)  # the method's own numbers at the epoch's end


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


def forward(module, batch: dict[str, torch.Tensor], hidden_layer: int | None,
            autocast: torch.dtype | None = None) -> ModelOutput:
    """One forward; with ``autocast`` (bfloat16) the module's matmuls run in that dtype under torch.autocast
    while its weights stay as they are (float32 masters), and the logits and hidden state are handed to the
    method in float32, so every loss is computed at full precision."""
    context = torch.autocast(batch["input_ids"].device.type, dtype=autocast) if autocast else nullcontext()
    with context:
        out = module(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            output_hidden_states=hidden_layer is not None, use_cache=False,
        )
    hidden = out.hidden_states[hidden_layer] if hidden_layer is not None else None
    if autocast:
        hidden = hidden.float() if hidden is not None else None
        return ModelOutput(out.logits.float(), batch["labels"], batch["attention_mask"], hidden)
    return ModelOutput(out.logits, batch["labels"], batch["attention_mask"], hidden)


def method_inputs(engine, reference, method: UnlearningMethod, batches: dict[str, dict],
                  autocast: torch.dtype | None = None) -> MethodInputs:
    layer = method.hidden_layer
    policy = {split: forward(engine, batches[split], layer, autocast) for split in method.splits}
    ref = {}
    if reference is not None:
        with torch.no_grad():
            ref = {split: forward(reference, batches[split], layer, autocast) for split in method.reference_splits}
    return MethodInputs(policy=policy, reference=ref)


def to_device(batches: dict[str, dict[str, torch.Tensor]], device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    return {split: {k: v.to(device, non_blocking=True) for k, v in batch.items()} for split, batch in batches.items()}


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """A scalar averaged over the gang (a collective); itself on one process."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return value
    total = value.detach().clone().float()
    torch.distributed.all_reduce(total)
    return total / torch.distributed.get_world_size()


def update(engine, method: UnlearningMethod, objectives: dict[str, torch.Tensor],
           parameters: list[torch.nn.Parameter], epoch: int = 1) -> dict[str, float]:
    """Turn objectives into one optimizer step: a sum, or the min-norm common descent direction (whose
    per-objective weights are returned). At each optimizer step (not each micro-batch under gradient
    accumulation) the method sees the step (``after_step``: PDU's dual update)."""
    weights: dict[str, float] = {}
    boundary = engine.is_gradient_accumulation_boundary()
    if method.combine == "mgda":
        from orchestrator.multiobjective import common_descent_backward

        weights = common_descent_backward(
            objectives, parameters, engine.backward, normalize=getattr(method.params, "normalize_gradients", False)
        )
    else:
        engine.backward(sum(objectives.values()))
    engine.step()
    if boundary:
        method.after_step(epoch, mean_over_ranks)
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


def run_epoch(engine, reference, method, loader, parameters, device, epoch: int = 1,
              autocast: torch.dtype | None = None) -> EpochStats:
    """One pass over ``loader``; ``autocast``: the dtype of the training forwards (None: the model's)."""
    stats = EpochStats()
    start = time.perf_counter()
    sums: dict[str, float] = {}
    weight_sums: dict[str, float] = {}
    engine.train()
    for batches in loader:
        batches = to_device(batches, device)
        objectives = method.objectives(method_inputs(engine, reference, method, batches, autocast))
        if not all_ranks_finite(objectives.values(), device):
            stats.diverged = True
            break
        weights = update(engine, method, objectives, parameters, epoch)
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
    stats.extras = dict(method.extras())
    return stats


def gather_epoch(stats: EpochStats, world_size: int) -> EpochStats:
    """Agree on divergence across the gang (one rank's NaN stops all) and sum tokens."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return stats
    flags = torch.tensor([float(stats.diverged), float(stats.tokens)])
    torch.distributed.all_reduce(flags)
    stats.diverged = bool(flags[0] > 0)
    stats.tokens = int(flags[1])
    return stats
