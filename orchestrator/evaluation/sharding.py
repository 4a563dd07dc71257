"""Sharding an evaluation over a gang: rank r takes examples r, r + W, … of every split, every rank runs
the same number of forwards (ZeRO-3 forwards are collective), and per-example values are gathered on rank 0."""
from __future__ import annotations

from typing import Any

import torch.distributed as dist


def shard_batches(n: int, rank: int, world_size: int, batch_size: int) -> list[tuple[list[int], int]]:
    """This rank's batches as (example indices, how many of them are real), strided over ranks.

    Every rank gets the same number of batches (that of the longest shard); a rank that runs out gets
    filler batches repeating one index, whose results the caller drops (real ones come first).
    """
    if world_size < 1 or not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"bad sharding: rank {rank}, world size {world_size}, batch size {batch_size}")
    if n == 0:
        return []
    own = list(range(rank, n, world_size))
    longest = -(-n // world_size)
    batches = []
    for b in range(-(-longest // batch_size)):
        real = own[b * batch_size:(b + 1) * batch_size]
        batches.append((real, len(real)) if real else ([own[-1] if own else 0], 0))
    return batches


def pack_generation_batches(splits: list[tuple[int, int]], rank: int, world_size: int,
                            batch_size: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """This rank's generation batches, filled across splits: ``splits`` holds (max_new_tokens, size) per
    split; returns (max_new_tokens, [(split position, example index), …]) per batch.

    Splits that decode the same number of tokens share batches, so a small split (8 forget prompts)
    does not pay a whole decoding loop alone: every step of greedy decoding costs about the same for 8
    or 32 rows on small models. Examples are strided over ranks as in ``shard_batches``; every rank gets
    the same number of batches per token budget (rank 0's), padded with empty filler batches.
    """
    if world_size < 1 or not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"bad sharding: rank {rank}, world size {world_size}, batch size {batch_size}")
    budgets = list(dict.fromkeys(tokens for tokens, _ in splits))  # first-appearance order
    batches = []
    for budget in budgets:
        members = [(position, size) for position, (tokens, size) in enumerate(splits) if tokens == budget]
        own = [(position, index) for position, size in members for index in range(rank, size, world_size)]
        longest = sum(-(-size // world_size) for _, size in members)  # rank 0 owns the most of every split
        for b in range(-(-longest // batch_size)):
            batches.append((budget, own[b * batch_size:(b + 1) * batch_size]))
    return batches


def gather_rows(rows: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    if world_size == 1:
        return rows
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"world_size {world_size} needs an initialised torch.distributed process group")
    parts: list[Any] = [None] * world_size
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part]
