"""GradNorm membership inference: per example (a batch of one), the mean over parameter tensors of the
gradient norm of its answer NLL (EOS excluded), with the models in train mode. Examples a model was trained
on sit near a minimum of their loss, so their gradients are small: a loss-like score (lower = member).
It differentiates every model the scorer combines (ULD: the target and the assistant)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from orchestrator.encoding import IGNORE_INDEX, EncodedExample, collate, encode_pair
from orchestrator.evaluation import metrics as M
from orchestrator.evaluation.config import EvalContext
from orchestrator.evaluation.teacher_forced import QASplit, document_example


@contextmanager
def differentiable(modules: list[torch.nn.Module]) -> Iterator[list[torch.nn.Parameter]]:
    """Every parameter of ``modules`` requiring grad, the modules in train mode; both restored on exit."""
    parameters = list(dict.fromkeys(p for module in modules for p in module.parameters()))
    flags = [p.requires_grad for p in parameters]
    modes = [module.training for module in modules]
    try:
        for p in parameters:
            p.requires_grad_(True)
        for module in modules:
            module.train()
        yield parameters
    finally:
        for p, flag in zip(parameters, flags):
            p.requires_grad_(flag)
        for module, mode in zip(modules, modes):
            module.train(mode)


def _example_without_eos(ctx: EvalContext, split: QASplit, index: int) -> EncodedExample:
    if split.text:
        example = document_example(ctx, split, index)
    else:
        row = split.rows[index]
        example = encode_pair(ctx.tokenizer, row["question"], row["answer"], ctx.config.template, ctx.config.max_length)
    labels = list(example.labels)
    scored = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if len(scored) > 1 and labels[scored[-1]] == ctx.tokenizer.eos_token_id:
        labels[scored[-1]] = IGNORE_INDEX  # the reference's MIA scores leave the EOS out
    return EncodedExample(example.input_ids, labels, example.prompt_length)


def gradient_norm(ctx: EvalContext, split: QASplit, index: int) -> float:
    """The GradNorm score of one example (see the module doc)."""
    batch = collate([_example_without_eos(ctx, split, index)], ctx.pad)
    labels = batch["labels"][:, 1:].to(ctx.device)
    mask = labels != IGNORE_INDEX
    with torch.enable_grad(), differentiable(ctx.scorer.modules()) as parameters:
        logits = ctx.scorer.logits(batch["input_ids"].to(ctx.device), batch["attention_mask"].to(ctx.device))
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token = logprobs.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
        loss = -(token * mask).sum() / mask.sum().clamp(min=1)
        gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
    return M.gradient_norm_score([float(g.norm()) for g in gradients if g is not None])
