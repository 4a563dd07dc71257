"""A small byte-level BPE tokenizer trained on the benchmark's own strings (embedded benchmark only).

Byte-level BPE never needs ``<unk>`` and decodes back to the exact input, so metrics computed on decoded
generations (ROUGE) see the text the model produced. ``<unk>`` is still reserved for tools that expect it.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from orchestrator.templates import resolve_template

# Ids follow Llama's order: <unk>=0, <s>=1, </s>=2, then <pad>=3.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
_TEXT_FIELDS = ("question", "answer", "paraphrased_question", "paraphrased_answer", "text")


def train_tokenizer(texts: Sequence[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE over ``texts``; ``<s>`` is prepended when ``add_special_tokens=True``.

    Deterministic for the same texts (the BPE trainer breaks count ties by the pair itself).
    """
    if not texts:
        raise ValueError("train_tokenizer needs at least one text")
    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (special tokens + 256 bytes), got {vocab_size}")
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        # The default clean-up rewrites " ." to "." and would break decode(encode(text)) == text.
        clean_up_tokenization_spaces=False,
    )


def benchmark_texts(benchmark: Mapping[str, Sequence[dict]], prompt_template: str | None = "qa") -> list[str]:
    """Every string of every split (perturbed answers and corpus text included) and the template answers,
    once each, in first-seen order (splits overlap; repeating them would only re-weight BPE counts).

    With ``prompt_template`` each question is also given as the prompt the model sees, so the template's
    own words ("Question:", "Answer:") become single tokens instead of a handful of bytes each.
    """
    from orchestrator.data.training import TEMPLATE_ANSWERS

    strings = list(_row_strings(benchmark))
    if prompt_template is not None:
        prompt = resolve_template(prompt_template)
        strings += [prompt.format(question=row["question"]) for rows in benchmark.values() for row in rows
                    if isinstance(row.get("question"), str)]
    return list(dict.fromkeys([*strings, *TEMPLATE_ANSWERS]))


def _row_strings(benchmark: Mapping[str, Sequence[dict]]) -> Iterable[str]:
    for rows in benchmark.values():
        for row in rows:
            for field in _TEXT_FIELDS:
                if isinstance(row.get(field), str):
                    yield row[field]
            yield from (wrong for wrong in row.get("perturbed_answer") or () if isinstance(wrong, str))
