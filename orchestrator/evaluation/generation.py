"""Generation metrics: batched greedy decoding (``Scorer.generate``, KV cache) on left-padded prompts,
scored against a reference text — TOFU's ROUGE, MUSE's VerbMem and KnowMem."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from orchestrator.encoding import collate_prompts, encode_pair, encode_prompt
from orchestrator.evaluation import metrics as M
from orchestrator.evaluation.config import EvalConfig, EvalContext
from orchestrator.evaluation.teacher_forced import QASplit
from orchestrator.templates import resolve_template

# The reference's stop strings for KnowMem answers (a "qa"-style prompt would go on with a new question).
KNOWMEM_STOPWORDS = ("\n\n", "\nQuestion", "Question:")


@dataclass(frozen=True)
class GenerationSplit:
    """A split scored by greedy generation against a reference text."""

    role: str
    name: str
    size: int
    prepare: Callable[[int], tuple[list[int], str] | None]  # index → (prompt ids, reference text) or skip
    max_new_tokens: int
    similarity: Callable[[str, str], float]  # (generation, reference) → score
    metric: str
    stopwords: tuple[str, ...] = ()


def qa_reference_text(tokenizer, question: str, answer: str, config: EvalConfig) -> str:
    """The reference's ground truth: decoded prompt+answer with the decoded prompt removed, stripped."""
    full = encode_pair(tokenizer, question, answer, config.template, config.max_length).input_ids
    prompt = encode_prompt(tokenizer, question, config.template)
    full_text = tokenizer.decode(full, skip_special_tokens=True)
    return full_text.replace(tokenizer.decode(prompt, skip_special_tokens=True), "").strip()


def decode_generation(tokenizer, tokens: list[int], eos: int, stopwords: tuple[str, ...]) -> str:
    """Text up to the first EOS (special tokens skipped), cut at the first stop string, stripped."""
    if eos in tokens:
        tokens = tokens[:tokens.index(eos)]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    for word in stopwords:
        if word in text:
            text = text.split(word)[0]
    return text.strip()


def generate_batch(ctx: EvalContext, items: list[tuple[GenerationSplit, int]], max_new_tokens: int) -> list[float | None]:
    """Greedy generations of (split, example index) items, possibly from several splits, in one call."""
    prepared = [split.prepare(i) for split, i in items]
    live = [(split, p) for (split, _), p in zip(items, prepared) if p is not None]
    # A batch whose examples are all skipped (or a filler batch) still runs one dropped prompt: forwards
    # stay collective.
    prompts = [p[0] for _, p in live] or [[ctx.tokenizer.eos_token_id]]
    batch = collate_prompts(prompts, ctx.pad)
    tokens = ctx.scorer.generate(
        batch["input_ids"].to(ctx.device), batch["attention_mask"].to(ctx.device), max_new_tokens,
        eos_token_id=ctx.tokenizer.eos_token_id, pad_token_id=ctx.pad, synced=ctx.synced,
    ).tolist()
    eos = ctx.tokenizer.eos_token_id
    scores = iter(split.similarity(decode_generation(ctx.tokenizer, row, eos, split.stopwords), reference)
                  for row, (split, (_, reference)) in zip(tokens, live))
    return [None if p is None else next(scores) for p in prepared]


def qa_generation(role: str, split: QASplit, tokenizer, config: EvalConfig, *, metric: str, max_new_tokens: int,
                   similarity, stopwords: tuple[str, ...] = (), prompt_template: str | None = None) -> GenerationSplit:
    """Greedy answers to a split's questions; ``prompt_template`` (default: the config's) prompts them."""

    def prepare(index: int) -> tuple[list[int], str]:
        row = split.rows[index]
        prompt = encode_prompt(tokenizer, row["question"], prompt_template or config.template)
        return prompt, qa_reference_text(tokenizer, row["question"], row["answer"], config)

    return GenerationSplit(role, split.name, len(split.rows), prepare, max_new_tokens, similarity, metric, stopwords)


def verbmem_generation(name: str, rows: list[Any], tokenizer, config: EvalConfig) -> GenerationSplit:
    """MUSE VerbMem: the first ``verbmem_prefix_tokens`` tokens of a paragraph prompt its continuation."""

    def prepare(index: int) -> tuple[list[int], str] | None:
        row = rows[index]
        text = row["text"] if isinstance(row, dict) else str(row)
        full = tokenizer(text, add_special_tokens=True)["input_ids"]
        body = tokenizer(text, add_special_tokens=False)["input_ids"]
        lead = _leading_specials(full, body)  # keep the BOS the tokenizer adds to a prompt
        cut = config.verbmem_prefix_tokens
        continuation = body[cut:cut + config.verbmem_new_tokens]
        if not continuation:
            return None  # too short to have a continuation
        return full[:lead + cut], tokenizer.decode(continuation, skip_special_tokens=True).strip()

    return GenerationSplit("verbmem", name, len(rows), prepare, config.verbmem_new_tokens, M.rouge_l_f1, "verbmem")


def with_examples(template: str, examples: list[dict]) -> str:
    """MUSE's KnowMem prompt: the solved examples first, each as template + answer + a blank line, then the
    question. With the ``qa`` template this is MUSE's own "Question: …\nAnswer: …\n\n" prefix."""
    resolved = resolve_template(template)
    shots = "".join(resolved.format(question=row["question"]) + row["answer"] + "\n\n" for row in examples)
    return shots.replace("{", "{{").replace("}", "}}") + resolved


def verbmem_prompt_generation(name: str, rows: list[dict], tokenizer, config: EvalConfig) -> GenerationSplit:
    """MUSE's own VerbMem set (``verbmem/forget``): each row's ``prompt``, a forget-text prefix, prompts a
    continuation compared with its ``gt`` (the true next 128 tokens), as MUSE's evaluator does. A prompt
    longer than the context leaves room for the continuation by dropping its oldest tokens (BOS stays)."""
    room = max(1, config.max_length - config.verbmem_new_tokens)

    def prepare(index: int) -> tuple[list[int], str]:
        row = rows[index]
        full = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
        lead = _leading_specials(full, tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
        if len(full) > room:
            full = full[:lead] + full[len(full) - max(1, room - lead):]
        return full, str(row["gt"]).strip()

    return GenerationSplit("verbmem", name, len(rows), prepare, config.verbmem_new_tokens, M.rouge_l_f1, "verbmem")


def _leading_specials(full: list[int], body: list[int]) -> int:
    for lead in range(len(full) - len(body) + 1):
        if full[lead:lead + len(body)] == body:
            return lead
    return 0
