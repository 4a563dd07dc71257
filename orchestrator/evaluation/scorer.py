"""Scorers: what every metric evaluates. A scorer gives teacher-forced logits and generates greedily.

A plain model, a LoRA model, a DeepSpeed-wrapped module and ULD's logit-difference composite all go
through the same metric code by implementing ``logits``, ``start`` and ``step``; greedy generation with a
KV cache is written once, here.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class Scorer:
    """Base: subclasses implement logits/start/step; ``generate`` is shared."""

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [batch, seq, vocab] for a right-padded batch."""
        raise NotImplementedError

    def modules(self) -> list[torch.nn.Module]:
        """The models whose weights make the scored distribution (GradNorm differentiates them all)."""
        return [module for value in vars(self).values() for module in
                ([value] if isinstance(value, torch.nn.Module) else value.modules() if isinstance(value, Scorer) else [])]

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Run a left-padded prompt batch; return next-token logits [batch, vocab] and a decoding state."""
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Feed one token per row [batch]; return next-token logits [batch, vocab] and the new state."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int,
        pad_token_id: int,
        synced: bool = False,
    ) -> torch.Tensor:
        """Greedy continuation [batch, ≤ max_new_tokens] of left-padded prompts, padded after EOS.

        ``synced``: keep stepping until every rank is done, so that ranks whose forward passes are
        collective (ZeRO-3 gathers parameters in forward) issue the same number of them.
        """
        logits, state = self.start(input_ids, attention_mask)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        generated = []
        for position in range(max_new_tokens):
            tokens = logits.argmax(-1)
            tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
            generated.append(tokens)
            finished |= tokens == eos_token_id
            if position == max_new_tokens - 1 or _all_done(finished, synced):
                break
            logits, state = self.step(tokens, state)
        if not generated:
            return input_ids.new_zeros((input_ids.shape[0], 0))
        return torch.stack(generated, dim=1)


def _all_done(finished: torch.Tensor, synced: bool) -> bool:
    pending = torch.tensor([float((~finished).sum())], device=finished.device)
    if synced and dist.is_available() and dist.is_initialized():
        dist.all_reduce(pending)
    return pending.item() == 0


class ModelScorer(Scorer):
    """Scorer over a Hugging Face causal LM (plain, peft-wrapped or a DeepSpeed engine's module)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
        # Left padding: positions count from each row's first real token.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True
        )
        state = (out.past_key_values, attention_mask, position_ids[:, -1])
        return out.logits[:, -1, :], state

    def step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        cache, attention_mask, last_position = state
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=1)
        position = last_position + 1
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=attention_mask,
            position_ids=position[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits[:, -1, :], (out.past_key_values, attention_mask, position)
