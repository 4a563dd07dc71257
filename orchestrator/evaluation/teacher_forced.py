"""Teacher-forced scoring: a batch of question/answer examples is ONE forward over all their sequences
(answer, paraphrased answer, each perturbed answer), right-padded; every probability-based number
(probability, truth ratio, extraction strength, exact memorisation, the MIA scores) comes from that pass.
Only label positions are read, so padding cannot move a number."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from orchestrator.encoding import (
    IGNORE_INDEX,
    EncodedExample,
    collate,
    encode_pair,
    encode_text,
)
from orchestrator.evaluation import metrics as M
from orchestrator.evaluation.config import EvalContext

# Answer-token rows per log-softmax chunk: bounds the float32 [rows, vocab] temporaries (~64 MB at 128k).
_LOGSOFTMAX_ELEMENTS = 1 << 24


@dataclass
class SequenceScores:
    """One teacher-forced sequence, over its answer tokens (prompt masked, EOS included, last)."""

    token_logprobs: np.ndarray  # [n] log p(y_t | x, y_<t), float64 from float32 log-softmax
    correct: np.ndarray  # [n] bool: argmax of the logits == label
    z_scores: np.ndarray  # [n] Min-k%++ (log p(y_t) − μ_t) / σ_t over the vocabulary
    label_ids: list[int]  # the n answer token ids


def sequence_scores(logits: torch.Tensor, labels: torch.Tensor) -> list[SequenceScores]:
    """Per-row answer-token statistics of a right-padded batch: logits [R, T, V], labels [R, T].

    Only label positions are read (padding and prompt carry IGNORE_INDEX), so padding cannot move a
    number. Position t's logits score token t + 1.
    """
    labels = labels[:, 1:].to(logits.device)
    mask = labels != IGNORE_INDEX  # [R, T-1]
    counts = mask.sum(-1).tolist()
    answer_logits = logits[:, :-1][mask]  # [N, V], row 0's answer tokens first
    targets = labels[mask]  # [N]
    chunk = max(1, _LOGSOFTMAX_ELEMENTS // max(1, answer_logits.shape[-1]))
    pieces = [_token_statistics(answer_logits[s:s + chunk], targets[s:s + chunk])
              for s in range(0, targets.shape[0], chunk)]
    if pieces:
        logprobs, correct, z = (torch.cat(parts).cpu().numpy() for parts in zip(*pieces))
    else:
        logprobs, correct, z = np.zeros(0, np.float32), np.zeros(0, bool), np.zeros(0, np.float32)
    target_ids = targets.cpu().tolist()
    out, start = [], 0
    for count in counts:
        end = start + count
        out.append(SequenceScores(logprobs[start:end].astype(np.float64), correct[start:end],
                                  z[start:end].astype(np.float64), target_ids[start:end]))
        start = end
    return out


def _token_statistics(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[n, V] logits, [n] targets → label log-prob, argmax correctness, Min-k%++ z-score, each [n]."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token = logprobs.gather(-1, targets[:, None]).squeeze(-1)
    probs = logprobs.exp()
    mu = (probs * logprobs).sum(-1)
    # Σ p (log p − μ)² equals the reference's Σ p (log p)² − μ², without its cancellation in float32
    # (near-uniform rows lose three or four digits that way).
    variance = (probs * (logprobs - mu[:, None]).square()).sum(-1).clamp(min=1e-6)
    return token, logits.argmax(-1) == targets, (token - mu) / variance.sqrt()


# ----------------------------------------------------------------- what each split is scored on
@dataclass(frozen=True)
class QASplit:
    """A question/answer split and which sequences and numbers it needs."""

    role: str  # forget | retain | holdout | ra | wf
    name: str  # split name, used in the samples table
    rows: list[dict[str, Any]]
    paraphrase: bool = False  # score paraphrased_answer (the truth ratio's "correct" on forget/retain)
    perturbed: bool = False  # score every perturbed_answer (truth ratio)
    memorisation: bool = False  # extraction strength, exact memorisation
    mia: bool = False  # LOSS, ZLib, Min-k%, Min-k%++ scores
    text: bool = False  # MUSE documents: the first encode_text chunk, every token scored (no question)


def _answers(split: QASplit, index: int) -> list[str]:
    row = split.rows[index]
    try:
        answers = [row["answer"]]
        if split.paraphrase:
            answers.append(row["paraphrased_answer"])
        if split.perturbed:
            answers.extend(list(row["perturbed_answer"]))
    except (KeyError, TypeError) as error:
        raise ValueError(f"split {split.name!r} row {index}: missing field {error}") from None
    return answers


def score_batch(ctx: EvalContext, split: QASplit, indices: list[int]) -> list[list[SequenceScores]]:
    """All sequences of the batch's examples in one padded forward; grouped back per example."""
    encoded: list[EncodedExample] = []
    layout = []
    for index in indices:
        if split.text:
            encoded.append(document_example(ctx, split, index))
            layout.append(1)
            continue
        answers = _answers(split, index)
        question = split.rows[index]["question"]
        encoded += [encode_pair(ctx.tokenizer, question, a, ctx.config.template, ctx.config.max_length)
                    for a in answers]
        layout.append(len(answers))
    group = len(encoded) if ctx.rows_per_forward is None else ctx.rows_per_forward
    scores: list[SequenceScores] = []
    for start in range(0, len(encoded), group):
        batch = collate(encoded[start:start + group], ctx.pad)
        logits = ctx.scorer.logits(batch["input_ids"].to(ctx.device), batch["attention_mask"].to(ctx.device))
        scores += sequence_scores(logits, batch["labels"])
    per_example, start = [], 0
    for count in layout:
        per_example.append(scores[start:start + count])
        start += count
    return per_example


def document_example(ctx: EvalContext, split: QASplit, index: int) -> EncodedExample:
    """A document's first ``max_length`` tokens (MUSE's MIA truncates the same way); its last scored token
    is the EOS only when the document fits, so the MIA scores' drop-the-EOS cut may drop a text token."""
    try:
        return encode_text(ctx.tokenizer, split.rows[index]["text"], ctx.config.max_length)[0]
    except (KeyError, TypeError, IndexError):
        raise ValueError(f"split {split.name!r} row {index}: needs a non-empty 'text' field") from None


def example_values(ctx: EvalContext, split: QASplit, sequences: list[SequenceScores]) -> dict[str, float]:
    """Per-example numbers of one example from its scored sequences (answer first)."""
    answer, rest = sequences[0], sequences[1:]
    values = {"prob": M.length_normalised_probability(answer.token_logprobs)}
    if split.paraphrase:
        values["paraphrased_prob"] = M.length_normalised_probability(rest[0].token_logprobs)
        rest = rest[1:]
    if split.perturbed:
        perturbed = np.array([M.length_normalised_probability(s.token_logprobs) for s in rest])
        values.update({f"perturbed_prob_{j}": float(p) for j, p in enumerate(perturbed)})
        correct = values["paraphrased_prob"] if split.paraphrase else values["prob"]
        values["truth_ratio"] = float(M.truth_ratio(perturbed[None, :], [correct])[0])
        values["prob_mean_truth"] = float(M.prob_mean_truth(perturbed[None, :], [correct])[0])
        if not split.paraphrase:
            values["normalised_prob"] = float(M.normalised_probability([values["prob"]], perturbed[None, :])[0])
    # The reference's token-level metrics drop the last answer position (the EOS).
    if split.memorisation:
        values["extraction_strength"] = M.extraction_strength(answer.correct[:-1])
        em = M.exact_memorization(answer.correct[:-1])
        if em is not None:
            values["exact_memorization"] = em
    if split.mia:
        text = ctx.tokenizer.decode(answer.label_ids, skip_special_tokens=True)
        k = ctx.config.mink_k
        values.update(
            mia_loss=M.loss_score(answer.token_logprobs),
            mia_zlib=M.zlib_score(answer.token_logprobs, text),
            mia_mink=M.min_k_score(answer.token_logprobs[:-1], k),
            mia_minkpp=M.min_k_plus_plus_score(answer.z_scores[:-1], k),
        )
    return values
