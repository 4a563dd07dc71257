"""The utility rows a base model knows. TOFU's real-authors and world-facts sets measure what the pretrained
model knew before any fine-tuning; a row the base model cannot answer measures nothing (unlearning cannot
lose knowledge that was never there), so prepare keeps only the rows it answers.

Criterion: the base model's greedy answer contains every **distinguishing word** of the true answer — a word
of the answer that none of the row's perturbed (wrong) answers contains. The perturbed answers share the
answer's sentence and differ only in the fact, so the distinguishing words are the fact itself ("Paris";
"Jane", "Austen"). Words are compared case-insensitively, accents dropped ("García" = "garcia"), as whole
words ("Au" does not match inside "because"). A row without distinguishing words cannot be judged and is
not kept.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Any, Sequence

from orchestrator.data import row_id

UTILITY_SPLITS = ("real_authors", "world_facts")
_WORD = re.compile(r"[^\W_]+")  # runs of letters and digits


def words(text: str) -> list[str]:
    """Lower-cased words of ``text`` with accents removed (NFKD, combining marks dropped)."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return _WORD.findall(plain.lower())


def distinguishing_words(row: dict[str, Any]) -> frozenset[str]:
    """Words of the true answer that no perturbed answer contains: the fact the row asks about."""
    wrong = {word for answer in row.get("perturbed_answer") or () for word in words(answer)}
    return frozenset(words(row["answer"])) - wrong


def answers(row: dict[str, Any], generation: str) -> bool:
    """Whether ``generation`` states the row's fact (every distinguishing word present)."""
    needed = distinguishing_words(row)
    return bool(needed) and needed <= set(words(generation))


def known_row_ids(rows: Sequence[dict[str, Any]], generations: Sequence[str]) -> list[str | int]:
    """Ids (``data.row_id``) of the rows whose generation answers them, in row order."""
    if len(rows) != len(generations):
        raise ValueError(f"{len(rows)} rows but {len(generations)} generations")
    return [row_id(row, index) for index, (row, text) in enumerate(zip(rows, generations)) if answers(row, text)]


def greedy_answers(model_path: str, tokenizer_path: str, questions: Sequence[str], template: str,
                   max_new_tokens: int, batch_size: int = 16, trust_remote_code: bool = False) -> list[str]:
    """The model's greedy answers, prompted and decoded exactly as evaluation's ROUGE generations are
    (same template, left-padded batches, KV-cache decoding, cut at EOS), in float32."""
    import torch

    from orchestrator.encoding import collate_prompts, encode_prompt, pad_id
    from orchestrator.evaluation.generation import decode_generation
    from orchestrator.evaluation.scorer import ModelScorer
    from orchestrator.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
    scorer = ModelScorer(load_model(model_path, "float32", trust_remote_code).eval())
    eos, pad = tokenizer.eos_token_id, pad_id(tokenizer)
    texts: list[str] = []
    with torch.no_grad():
        for start in range(0, len(questions), batch_size):
            prompts = [encode_prompt(tokenizer, q, template) for q in questions[start:start + batch_size]]
            batch = collate_prompts(prompts, pad)
            tokens = scorer.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens, eos, pad).tolist()
            texts += [decode_generation(tokenizer, row, eos, ()) for row in tokens]
    return texts
