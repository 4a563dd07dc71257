"""The training Dataset: one encoded example per batch split a method asks for, and its collation.

Split builders: ``forget`` / ``retain`` (pairs, or document chunks), ``template`` (forget questions with an
"I don't know"-style answer re-drawn at each load) and ULD's ``forget_augmented`` / ``retain_augmented``.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from orchestrator.data.validation import is_document
from orchestrator.encoding import EncodedExample, collate, encode_pair, encode_text
from orchestrator.errors import DataError

TEMPLATE_ANSWERS: tuple[str, ...] = tuple(
    line.strip()
    for line in (Path(__file__).resolve().parent.parent / "assets" / "template_answers.txt").read_text("utf-8").splitlines()
    if line.strip()
)


# Batch splits this module builds (methods.base.SPLITS names what a method may ask for; a test keeps the
# two equal). Each item of an epoch yields one example of every split a method reads.
BATCH_SPLITS = ("forget", "retain", "template", "forget_augmented", "retain_augmented", "alternate")
# Splits whose answer is drawn afresh at each load from a list of candidates (per forget question).
DRAWN_SPLITS = ("template", "alternate")


def training_rows(benchmark: Mapping[str, Sequence[dict]], split_names: Sequence[str], paraphrases: bool) -> list[dict]:
    """The rows of several splits in order (e.g. ``["full", "utility_train"]`` for the target); with
    ``paraphrases`` each row also as (question → paraphrased answer)."""
    missing = [name for name in split_names if name not in benchmark]
    if missing:
        raise DataError(f"split '{missing[0]}': not in the data (available: {', '.join(sorted(benchmark))})")
    rows = [row for name in split_names for row in benchmark[name]]
    if paraphrases:
        rows += [dict(row, answer=row["paraphrased_answer"]) for row in rows if row.get("paraphrased_answer")]
    return rows


# ---------------------------------------------------------------- the training Dataset
class UnlearningDataset(Dataset):
    """Item i is one encoded example per split a method asks for.

    The first split defines the epoch and uses row i; ``template`` and ``alternate`` use row i too, so each
    pairs forget question i with its other answer (DPO-style methods contrast answers to the same prompt),
    re-drawn at each load from a generator seeded by (seed, i, how often i was loaded): runs repeat. Every
    other split uses row (i + offset) % n with a fixed per-split offset, so retain batches cycle.
    A document row (``text``, no ``question``: MUSE) becomes its ``encode_text`` chunks, each one example
    with labels on every token, so ``forget`` / ``retain`` may hold documents, question/answer pairs or both.
    """

    def __init__(self, rows: Mapping[str, Sequence[dict]], splits: Sequence[str], tokenizer: Any,
                 template: str = "qa", max_length: int = 256, seed: int = 0) -> None:
        unknown = [name for name in splits if name not in BATCH_SPLITS]
        if not splits or unknown:
            raise ValueError(f"splits must be a non-empty subset of {BATCH_SPLITS}, got {list(splits)}")
        if not rows.get("forget"):
            raise ValueError("UnlearningDataset needs non-empty 'forget' rows")
        if {"retain", "retain_augmented"} & set(splits) and not rows.get("retain"):
            raise ValueError(f"splits {list(splits)} need non-empty 'retain' rows")
        self.splits = tuple(splits)
        self.tokenizer, self.template, self.max_length, self.seed = tokenizer, template, max_length, seed
        forget, retain = list(rows["forget"]), list(rows.get("retain", ()))
        self._pairs = {name: _pairs_for(name, forget, retain, seed, tokenizer, max_length) for name in self.splits}
        self._offsets = {
            name: 0 if position == 0 or name in DRAWN_SPLITS
            else random.Random(f"{seed}:{name}").randrange(len(self._pairs[name]))
            for position, name in enumerate(self.splits)
        }
        self._encoded: dict[tuple[str, int], EncodedExample] = {}
        self._loads: dict[tuple[str, int], int] = {}
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Mix the epoch into template draws: DataLoader workers that are re-created each epoch start
        with fresh load counters and would otherwise repeat the previous epoch's answers."""
        self._epoch = epoch

    def __len__(self) -> int:
        return len(self._pairs[self.splits[0]])

    def __getitem__(self, index: int) -> dict[str, EncodedExample]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        item = {}
        for name in self.splits:
            row = (index + self._offsets[name]) % len(self._pairs[name])
            item[name] = self._drawn_example(name, row) if name in DRAWN_SPLITS else self._static_example(name, row)
        return item

    def _static_example(self, split: str, row: int) -> EncodedExample:
        item = self._pairs[split][row]
        if isinstance(item, EncodedExample):  # a document chunk, encoded up front
            return item
        key = (split, row)
        if key not in self._encoded:
            question, answer = item
            self._encoded[key] = encode_pair(self.tokenizer, question, answer, self.template, self.max_length)
        return self._encoded[key]

    def _drawn_example(self, split: str, row: int) -> EncodedExample:
        """Forget question ``row`` with one of its candidate answers, drawn from a generator seeded by
        (seed, split, epoch, row, how often it was loaded): every load may differ, every run repeats."""
        loads = self._loads.get((split, row), 0)
        self._loads[(split, row)] = loads + 1
        question, candidates = self._pairs[split][row]
        answer = random.Random(f"{self.seed}:{split}:{self._epoch}:{row}:{loads}").choice(candidates)
        return encode_pair(self.tokenizer, question, answer, self.template, self.max_length)


def _pairs_for(split: str, forget: list[dict], retain: list[dict], seed: int, tokenizer: Any,
               max_length: int) -> list[tuple[str, str] | EncodedExample]:
    """(question, answer) pairs of one split, or chunks for document rows of ``forget`` / ``retain``; the
    drawn splits hold (question, candidate answers): the template answers, or the row's ``alternate``
    answers (AltPO: from the data, or generated by the target in prepare)."""
    if split in ("forget", "retain"):
        return _pairs_or_chunks(forget if split == "forget" else retain, tokenizer, max_length)
    _require_fields(forget, ("question",), split)  # template answers and ULD's augmentation need questions
    if split == "template":
        return [(row["question"], TEMPLATE_ANSWERS) for row in forget]
    if split == "alternate":
        _require_fields(forget, ("alternate",), split)
        return [(row["question"], alternates_of(row)) for row in forget]
    if split == "forget_augmented":
        # ULD's D'_f: each forget pair plus two paraphrased versions of it.
        _require_fields(forget, ("paraphrased_question", "paraphrased_answer"), split)
        return [
            pair
            for row in forget
            for pair in ((row["question"], row["answer"]),
                         (row["paraphrased_question"], row["paraphrased_answer"]),
                         (row["question"], row["paraphrased_answer"]))
        ]
    # ULD's D'_r: |D_f| retain pairs plus two wrong-answer ("distractor") versions of each forget pair.
    _require_fields(forget, ("perturbed_answer",), split)
    chosen = random.Random(f"{seed}:retain_augmented").sample(range(len(retain)), min(len(forget), len(retain)))
    retain_pairs = [(retain[i]["question"], retain[i]["answer"]) for i in sorted(chosen)]
    distractors = [(row["question"], wrong) for row in forget for wrong in row["perturbed_answer"][:2]]
    return retain_pairs + distractors


def _pairs_or_chunks(rows: Sequence[dict], tokenizer: Any, max_length: int) -> list[tuple[str, str] | EncodedExample]:
    items: list[tuple[str, str] | EncodedExample] = []
    for row in rows:
        if is_document(row):
            items += encode_text(tokenizer, row["text"], max_length)
        else:
            items.append((row["question"], row["answer"]))
    return items


def alternates_of(row: Mapping[str, Any]) -> tuple[str, ...]:
    """A row's ``alternate`` field, one string or a list of them, as candidates."""
    value = row["alternate"]
    return (value,) if isinstance(value, str) else tuple(value)


def _require_fields(rows: Sequence[dict], fields: Sequence[str], split: str) -> None:
    for index, row in enumerate(rows):
        for field in fields:
            if not row.get(field):
                raise DataError(f"forget:{index}: field '{field}': missing, needed for split '{split}'")


def collate_splits(items: Sequence[Mapping[str, EncodedExample]], pad_id: int) -> dict[str, dict[str, torch.Tensor]]:
    """A list of UnlearningDataset items → split → right-padded batch (input_ids, attention_mask, labels)."""
    if not items:
        raise ValueError("collate_splits needs at least one item")
    return {split: collate([item[split] for item in items], pad_id) for split in items[0]}
