"""Robustness probes, the pure parts: does an unlearned checkpoint's forgetting survive?

Two attacks from METHODS.md ("Robustness probes"), each producing a model that the usual suite re-scores
(the results' ``probe`` column: ``int8``, ``int4``, ``relearn``):

- **Quantization** (Zhang et al., ICLR 2025, arXiv 2410.16454): round-to-nearest weight quantization of
  every linear layer with per-output-channel symmetric scales, dequantised back to the weight's dtype.
  An unlearning update smaller than half a quantization step rounds back to the original model's grid
  value, so the forgotten answer returns.
- **Relearning** (arXiv 2406.13356, 2402.16835): a few epochs of plain NLL fine-tuning on a small part of
  the forget set, then the forget metrics are scored on the rest.

Everything here takes a model and plain arguments and runs in one process (no Ray, no DeepSpeed): the
probe gathers the checkpoint into an ordinary module first.
"""
from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from orchestrator.encoding import IGNORE_INDEX

QUANTIZATION_BITS = (8, 4)


# ---------------------------------------------------------------- quantization
def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in QUANTIZATION_BITS:
        raise ValueError(
            f"robustness.quantization: bits must be one of {', '.join(map(str, QUANTIZATION_BITS))}, got {bits!r}"
        )
    return 2 ** (bits - 1) - 1  # qmax: 127 for int8, 7 for int4


def quantize_rows(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest, symmetric, one scale per row (output channel) of ``weight`` [out, in].

    s = max|w| / qmax, w_q = clamp(round(w / s), −qmax, qmax) · s, returned in ``weight``'s dtype. Ties
    round half to even (torch.round). A zero row has no scale and stays zero. The arithmetic runs in
    float32 (float64 for float64 weights), so bf16/fp16 weights are only rounded once, at the end.
    """
    qmax = _check_bits(bits)
    if weight.ndim != 2 or weight.numel() == 0:
        raise ValueError(
            f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)} "
            "(a ZeRO-3 partitioned parameter must be gathered first)"
        )
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(work_dtype)
    scale = w.abs().amax(dim=1, keepdim=True) / qmax  # [out, 1]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero rows: 0 / 1 = 0
    q = torch.clamp(torch.round(w / safe), -qmax, qmax)
    return (q * safe).to(weight.dtype)


def _tied_parameter_ids(model: torch.nn.Module) -> set[int]:
    """ids of parameters owned by a non-Linear module: a Linear weight among them is tied to it."""
    return {
        id(param)
        for module in model.modules()
        if not isinstance(module, torch.nn.Linear)
        for param in module.parameters(recurse=False)
    }


def quantize_linear_weights(model: torch.nn.Module, bits: int) -> int:
    """Quantize, in place, the weight of every ``torch.nn.Linear`` in ``model``; return how many.

    Biases, embeddings and norms stay in full precision. lm_head is quantized when it has its own weight;
    an lm_head TIED to the input embedding is left alone: quantizing it would quantize the embedding
    table too, which is not a linear layer, and Zhang et al. quantize linear layers only (transformers'
    bitsandbytes and GPTQ integrations likewise keep tied and output embeddings in full precision). A
    weight shared by several Linears is quantized once. A peft model must be merged first
    (``merged_for_quantization``): LoRA's A and B are Linears themselves, and a deployed LoRA model is
    served merged.
    """
    _check_bits(bits)
    if any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        raise ValueError("model holds LoRA layers: merge them first (merged_for_quantization) and quantize that")
    tied = _tied_parameter_ids(model)
    done: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            weight = module.weight
            if id(weight) in tied or id(weight) in done:
                continue
            weight.copy_(quantize_rows(weight, bits))
            done.add(id(weight))
    return len(done)


def merged_for_quantization(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` as served: a peft model with its adapters merged (``merge_and_unload``)
    into a plain model, any other model copied as is. The caller's model is not touched (merging
    rewrites the base weights in place, hence the copy)."""
    copied = copy.deepcopy(model)
    if isinstance(copied, PeftModel):
        copied = copied.merge_and_unload()
    if any(isinstance(module, BaseTunerLayer) for module in copied.modules()):
        raise ValueError(f"{type(model).__name__}: adapter layers remain after merging; cannot quantize it as served")
    return copied


def quantize_copy(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    """A quantized copy of ``model`` (LoRA merged first); the original stays unchanged.

    Holds a second full copy of the weights while it exists: free it once the probe is scored.
    """
    _check_bits(bits)  # fail before copying a large model
    quantized = merged_for_quantization(model)
    quantize_linear_weights(quantized, bits)
    return quantized


class QuantizedULD(NamedTuple):
    """ULD's two served models after quantization: build ``LogitDifferenceScorer(target, assistant, …)``."""

    target: torch.nn.Module
    assistant: torch.nn.Module


def quantize_uld(target: torch.nn.Module, assistant: torch.nn.Module, bits: int) -> QuantizedULD:
    """Quantize what ULD serves: copies of the target (every linear) and of the assistant with its LoRA
    merged. Each is quantized on its own per-row scales, as two deployed models would be; the
    composite's alpha and filter rate are unchanged, so the caller rebuilds the scorer from these two."""
    return QuantizedULD(quantize_copy(target, bits), quantize_copy(assistant, bits))


# ---------------------------------------------------------------- relearning
def relearn_split(n_rows: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Rows of the forget set to relearn on and the rest, which is scored: both sorted, disjoint, covering
    range(n_rows).

    The attack subset has round(fraction · n_rows) rows (halves round up), at least 1 and at most
    n_rows − 1 so that something is left to score; it is ``random.Random(seed).sample`` of the rows.
    """
    if n_rows < 2:
        raise ValueError(f"relearning needs at least 2 forget rows (1 to relearn, 1 to score), got {n_rows}")
    if not 0 < fraction < 1:
        raise ValueError(f"relearning fraction must be in (0, 1), got {fraction}")
    size = min(n_rows - 1, max(1, math.floor(fraction * n_rows + 0.5)))
    attack = sorted(random.Random(seed).sample(range(n_rows), size))
    chosen = set(attack)
    return attack, [row for row in range(n_rows) if row not in chosen]


def _nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the batch's labelled tokens (position t predicts label t + 1)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, :-1, :].float()  # [batch, seq − 1, vocab]
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def relearn(
    model: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    lr: float,
    epochs: int,
    weight_decay: float = 0.0,
) -> list[float]:
    """Fine-tune ``model`` in place on ``batches`` with plain NLL; return each epoch's mean batch loss.

    ``batches``: collated by ``orchestrator.encoding.collate`` (input_ids, attention_mask, labels), visited
    in the given order every epoch (shuffle beforehand if wanted). AdamW at a constant ``lr``, the trial's
    optimizer, without warm-up, decay or clipping: the attack is the plainest fine-tune. Weight decay
    defaults to 0 so the attack only adds what the data pulls back. It trains the parameters that
    require grad, so a peft model relearns through its adapter (peft freezes the base); a frozen model
    raises. The loss of an epoch is the unweighted mean of its batches' token-mean losses, each taken
    before that batch's step (so epoch 1's first term is the untouched model's loss).
    """
    if not lr > 0:
        raise ValueError(f"relearning lr must be > 0, got {lr}")
    if epochs < 1:
        raise ValueError(f"relearning epochs must be ≥ 1, got {epochs}")
    if not batches:
        raise ValueError("relearning needs at least one batch")
    parameters = [param for param in model.parameters() if param.requires_grad]
    if not parameters:
        raise ValueError("model has no parameter that requires grad: nothing to relearn (requires_grad_(True)?)")
    device = parameters[0].device
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    was_training = model.training
    model.train()
    epoch_losses = []
    try:
        for _ in range(epochs):
            losses = []
            for batch in batches:
                loss = _nll(model, {key: value.to(device) for key, value in batch.items()})
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            epoch_losses.append(sum(losses) / len(losses))
    finally:
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
    return epoch_losses


def relearn_copy(
    model: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    lr: float,
    epochs: int,
    weight_decay: float = 0.0,
) -> tuple[torch.nn.Module, list[float]]:
    """``relearn`` on a deep copy: (the relearned copy, its per-epoch losses); ``model`` stays unchanged."""
    relearned = copy.deepcopy(model)
    return relearned, relearn(relearned, batches, lr, epochs, weight_decay)
