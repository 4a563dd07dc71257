"""Tokenisation of question/answer pairs and documents, shared by training and evaluation.

Conventions follow the reference evaluator (open-unlearning): prompt + answer are tokenised as ONE
string; the label mask covers as many leading tokens as the prompt alone tokenises to; an EOS token is
appended to the answer. The prompt templates live in templates.py.
Raw text documents (MUSE) are plain LM sequences instead: ``encode_text`` chunks them, no template.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import IGNORE_INDEX
from orchestrator.templates import resolve_template


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens
    prompt_length: int


def encode_prompt(tokenizer, question: str, template: str) -> list[int]:
    return tokenizer(resolve_template(template).format(question=question), add_special_tokens=True)["input_ids"]


def encode_pair(tokenizer, question: str, answer: str, template: str, max_length: int) -> EncodedExample:
    """Tokenise prompt + answer as one string, cut to ``max_length``, then append EOS (unless the cut already
    ends on it), and mask as many leading tokens as the prompt alone tokenises to (cut the same way).

    Cutting before appending keeps the EOS of a long answer, as the reference does: the metrics that drop
    the last answer position (extraction strength, exact memorisation, Min-k%) then drop the EOS, not a
    real answer token. A sequence is therefore at most ``max_length + 1`` tokens.
    """
    prompt = resolve_template(template).format(question=question)
    full_ids = tokenizer(prompt + answer, add_special_tokens=True)["input_ids"][:max_length]
    if not full_ids or full_ids[-1] != tokenizer.eos_token_id:
        full_ids = full_ids + [tokenizer.eos_token_id]
    prompt_length = min(len(tokenizer(prompt, add_special_tokens=True)["input_ids"][:max_length]), len(full_ids))
    labels = [IGNORE_INDEX] * prompt_length + full_ids[prompt_length:]
    return EncodedExample(full_ids, labels, prompt_length)


def encode_text(tokenizer, text: str, max_length: int) -> list[EncodedExample]:
    """A document (MUSE-style raw text) as plain LM sequences: no template, labels on every token.

    The document is tokenised once (with the tokenizer's BOS), EOS appended, and cut into consecutive
    chunks of ``max_length`` tokens. Chunks do not overlap, as in MUSE's own chunking, so the first token
    of each later chunk is context only (position t predicts t + 1 within a chunk). A last chunk of one
    token predicts nothing and is dropped: a method's NLL over it would be 0/0.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one token predicts the next), got {max_length}")
    ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    chunks = [ids[start:start + max_length] for start in range(0, len(ids), max_length)]
    return [EncodedExample(chunk, list(chunk), 0) for chunk in chunks if len(chunk) >= 2]


def pad_id(tokenizer) -> int:
    """With no pad token, EOS pads (as in the reference). A pad id outside the base vocabulary (an added
    ``<pad>`` the model has no embedding for, as in some Llama-2 TOFU tokenizers) pads with EOS too."""
    pad = tokenizer.pad_token_id
    if pad is None or pad >= getattr(tokenizer, "vocab_size", pad + 1):
        return tokenizer.eos_token_id
    return pad


def collate(examples: list[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch for teacher forcing: input_ids, attention_mask, labels [batch, seq]."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_prompts(prompts: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch for generation: input_ids, attention_mask [batch, seq]."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
