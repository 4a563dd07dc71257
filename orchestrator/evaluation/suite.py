"""The evaluation suite: every TOFU and MUSE metric of one model, batched and sharded over a gang.

Per split, examples go through the scorer in batches. A batch of B question/answer examples is ONE
teacher-forced forward over all their sequences (answer, paraphrased answer, each perturbed answer),
right-padded; every probability-based number (probability, truth ratio, extraction strength, exact
memorisation, the four MIA scores) comes from that pass. Generation metrics (ROUGE, VerbMem, KnowMem)
use batched greedy decoding with a KV cache (``Scorer.generate``) on left-padded prompts.

Sharding: rank r takes examples r, r + W, r + 2W, … of every split. ZeRO-3 forwards are collective
(parameters are gathered layer by layer), so every rank runs the same number of forwards: short shards
get filler batches whose results are dropped, and generation steps until every rank is done. Per-example
values are gathered on rank 0 and every aggregate is computed from them in index order, so one worker
and N workers give the same numbers. Metric definitions: ``metrics.py`` (reference: open-unlearning).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from orchestrator.data import KNOWMEM_EXAMPLE_SPLITS, VERBMEM_SPLIT, is_document
from orchestrator.encoding import (
    IGNORE_INDEX,
    EncodedExample,
    collate,
    collate_prompts,
    encode_pair,
    encode_prompt,
    encode_text,
    pad_id,
)
from orchestrator.evaluation import metrics as M
from orchestrator.evaluation.scorer import Scorer
from orchestrator.results import METRIC_COLUMNS
from orchestrator.templates import resolve_template

MIA_ATTACKS = ("loss", "zlib", "mink", "minkpp")
# The reference's stop strings for KnowMem answers (a "qa"-style prompt would go on with a new question).
KNOWMEM_STOPWORDS = ("\n\n", "\nQuestion", "Question:")
RETAIN_PERTURBED = "retain_perturbed"  # TOFU's evaluation set for the retain metrics, when present
# Answer-token rows per log-softmax chunk: bounds the float32 [rows, vocab] temporaries (~64 MB at 128k).
_LOGSOFTMAX_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 16  # examples per forward (each brings 2 + k sequences) and prompts per generate call
    max_new_tokens: int = 200  # greedy tokens for TOFU's ROUGE
    max_length: int = 256  # prompt + answer tokens of a teacher-forced sequence
    template: str = "qa"  # templates.PROMPT_TEMPLATES name or a format string with {question}
    mink_k: float = 0.4  # fraction of lowest tokens for Min-k% and Min-k%++
    retain_eval_size: int | None = None  # cap on retain examples; None: all of retain_perturbed if present, else as many as the forget split has
    verbmem_prefix_tokens: int = 32  # VerbMem without MUSE's verbmem_forget set: prompt = a forget text's first tokens
    verbmem_new_tokens: int = 128  # VerbMem continuation length (the fallback compares as many true tokens)
    knowmem_new_tokens: int = 32  # MUSE KnowMem answer length
    privleak_attack: str = "mink"  # which MIA's AUC privleak compares (the reference uses Min-k%)
    generation: bool = True  # False: skip every generation metric (ROUGE, model utility, MUSE)

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens", "max_length", "verbmem_prefix_tokens",
                     "verbmem_new_tokens", "knowmem_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"evaluation.{name} must be ≥ 1, got {getattr(self, name)}")
        if not 0 < self.mink_k <= 1:
            raise ValueError(f"evaluation.mink_k must be in (0, 1], got {self.mink_k}")
        if self.retain_eval_size is not None and self.retain_eval_size < 1:
            raise ValueError(f"evaluation.retain_eval_size must be ≥ 1 or None, got {self.retain_eval_size}")
        if self.privleak_attack not in MIA_ATTACKS:
            raise ValueError(f"evaluation.privleak_attack must be one of {MIA_ATTACKS}, got {self.privleak_attack!r}")


@dataclass
class ReferenceStats:
    """What a later run needs from this model when it serves as the retain model."""

    forget_truth_ratios: list[float]  # per forget example, index order (forget quality's KS sample)
    mia_auc: dict[str, float] = field(default_factory=dict)  # attack name → AUC (privleak's reference)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ReferenceStats":
        """Parse ``to_json`` output, or a reference-evaluation file holding it under ``"reference"``."""
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("reference"), dict):
            data = data["reference"]
        if not isinstance(data, dict) or not isinstance(data.get("forget_truth_ratios"), list):
            raise ValueError("reference stats JSON needs a 'forget_truth_ratios' list")
        return cls([float(v) for v in data["forget_truth_ratios"]],
                   {str(k): float(v) for k, v in data.get("mia_auc", {}).items()})


@dataclass
class EvalResult:
    metrics: dict[str, float | None]  # keys: results.METRIC_COLUMNS (rank 0; empty on other ranks)
    samples: list[dict[str, Any]]  # rows {split, index, metric, value}, one per per-example number
    reference: ReferenceStats | None  # this model's stats as a retain reference (rank 0)


# ----------------------------------------------------------------- teacher-forced scoring
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
class _QASplit:
    """A question/answer split and which sequences and numbers it needs."""

    role: str  # forget | retain | holdout | ra | wf
    name: str  # split name, used in the samples table
    rows: list[dict[str, Any]]
    paraphrase: bool = False  # score paraphrased_answer (the truth ratio's "correct" on forget/retain)
    perturbed: bool = False  # score every perturbed_answer (truth ratio)
    memorisation: bool = False  # extraction strength, exact memorisation
    mia: bool = False  # LOSS, ZLib, Min-k%, Min-k%++ scores
    text: bool = False  # MUSE documents: the first encode_text chunk, every token scored (no question)


@dataclass(frozen=True)
class _GenerationSplit:
    """A split scored by greedy generation against a reference text."""

    role: str
    name: str
    size: int
    prepare: Callable[[int], tuple[list[int], str] | None]  # index → (prompt ids, reference text) or skip
    max_new_tokens: int
    similarity: Callable[[str, str], float]  # (generation, reference) → score
    metric: str
    stopwords: tuple[str, ...] = ()


@dataclass
class _Context:
    scorer: Scorer
    tokenizer: Any
    config: EvalConfig
    device: torch.device
    synced: bool
    rows_per_forward: int | None  # None: all sequences of a batch in one forward (per-sample mode: 1)

    @property
    def pad(self) -> int:
        return pad_id(self.tokenizer)


def _answers(split: _QASplit, index: int) -> list[str]:
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


def _score_batch(ctx: _Context, split: _QASplit, indices: list[int]) -> list[list[SequenceScores]]:
    """All sequences of the batch's examples in one padded forward; grouped back per example."""
    encoded: list[EncodedExample] = []
    layout = []
    for index in indices:
        if split.text:
            encoded.append(_document_example(ctx, split, index))
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


def _document_example(ctx: _Context, split: _QASplit, index: int) -> EncodedExample:
    """A document's first ``max_length`` tokens (MUSE's MIA truncates the same way); its last scored token
    is the EOS only when the document fits, so the MIA scores' drop-the-EOS cut may drop a text token."""
    try:
        return encode_text(ctx.tokenizer, split.rows[index]["text"], ctx.config.max_length)[0]
    except (KeyError, TypeError, IndexError):
        raise ValueError(f"split {split.name!r} row {index}: needs a non-empty 'text' field") from None


def _example_values(ctx: _Context, split: _QASplit, sequences: list[SequenceScores]) -> dict[str, float]:
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


# ----------------------------------------------------------------- generation
def _qa_reference_text(tokenizer, question: str, answer: str, config: EvalConfig) -> str:
    """The reference's ground truth: decoded prompt+answer with the decoded prompt removed, stripped."""
    full = encode_pair(tokenizer, question, answer, config.template, config.max_length).input_ids
    prompt = encode_prompt(tokenizer, question, config.template)
    full_text = tokenizer.decode(full, skip_special_tokens=True)
    return full_text.replace(tokenizer.decode(prompt, skip_special_tokens=True), "").strip()


def _decode_generation(tokenizer, tokens: list[int], eos: int, stopwords: tuple[str, ...]) -> str:
    """Text up to the first EOS (special tokens skipped), cut at the first stop string, stripped."""
    if eos in tokens:
        tokens = tokens[:tokens.index(eos)]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    for word in stopwords:
        if word in text:
            text = text.split(word)[0]
    return text.strip()


def _generate_batch(ctx: _Context, items: list[tuple[_GenerationSplit, int]], max_new_tokens: int) -> list[float | None]:
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
    scores = iter(split.similarity(_decode_generation(ctx.tokenizer, row, eos, split.stopwords), reference)
                  for row, (split, (_, reference)) in zip(tokens, live))
    return [None if p is None else next(scores) for p in prepared]


def _qa_generation(role: str, split: _QASplit, tokenizer, config: EvalConfig, *, metric: str, max_new_tokens: int,
                   similarity, stopwords: tuple[str, ...] = (), prompt_template: str | None = None) -> _GenerationSplit:
    """Greedy answers to a split's questions; ``prompt_template`` (default: the config's) prompts them."""

    def prepare(index: int) -> tuple[list[int], str]:
        row = split.rows[index]
        prompt = encode_prompt(tokenizer, row["question"], prompt_template or config.template)
        return prompt, _qa_reference_text(tokenizer, row["question"], row["answer"], config)

    return _GenerationSplit(role, split.name, len(split.rows), prepare, max_new_tokens, similarity, metric, stopwords)


def _verbmem_generation(name: str, rows: list[Any], tokenizer, config: EvalConfig) -> _GenerationSplit:
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

    return _GenerationSplit("verbmem", name, len(rows), prepare, config.verbmem_new_tokens, M.rouge_l_f1, "verbmem")


def _with_examples(template: str, examples: list[dict]) -> str:
    """MUSE's KnowMem prompt: the solved examples first, each as template + answer + a blank line, then the
    question. With the ``qa`` template this is MUSE's own "Question: …\nAnswer: …\n\n" prefix."""
    resolved = resolve_template(template)
    shots = "".join(resolved.format(question=row["question"]) + row["answer"] + "\n\n" for row in examples)
    return shots.replace("{", "{{").replace("}", "}}") + resolved


def _verbmem_prompt_generation(name: str, rows: list[dict], tokenizer, config: EvalConfig) -> _GenerationSplit:
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

    return _GenerationSplit("verbmem", name, len(rows), prepare, config.verbmem_new_tokens, M.rouge_l_f1, "verbmem")


def _leading_specials(full: list[int], body: list[int]) -> int:
    for lead in range(len(full) - len(body) + 1):
        if full[lead:lead + len(body)] == body:
            return lead
    return 0


# ----------------------------------------------------------------- sharding
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


def _gather(rows: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    if world_size == 1:
        return rows
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"world_size {world_size} needs an initialised torch.distributed process group")
    parts: list[Any] = [None] * world_size
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


# ----------------------------------------------------------------- the suite
def evaluate(
    scorer: Scorer,
    tokenizer,
    data: dict[str, list[dict[str, Any]]],
    config: EvalConfig,
    *,
    forget_split: str,
    retain_split: str | None,
    holdout_split: str | None,
    retain_reference: ReferenceStats | None,
    target_model_utility: float | None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
) -> EvalResult:
    """Every metric of one model on ``data``'s splits, sharded over ``world_size`` ranks.

    ``data``: the forget / retain / holdout splits named by the arguments, ``real_authors`` and
    ``world_facts`` (utility), and optionally ``text_forget`` (paragraphs) and ``knowmem_forget`` /
    ``knowmem_retain`` (question/answer) for MUSE's metrics; metrics of absent splits are None.
    When the forget split holds documents ({"text"} rows: ``benchmark.kind: muse``), forget / retain /
    holdout are scored as text (probability, MIA AUCs, privleak), VerbMem continues the forget documents,
    there is no truth ratio or forget quality, and ``model_utility`` is KnowMem on retain questions.
    ``retain_reference``: the retain model's ReferenceStats (None: no forget quality; privleak against
    AUC 0.5, as the reference does). Call it on every rank, in eval mode, under torch.no_grad().
    """
    ctx = _Context(scorer, tokenizer, config, _scorer_device(scorer, device), world_size > 1, None)
    return _run(ctx, data, forget_split, retain_split, holdout_split, retain_reference, target_model_utility,
                rank, world_size)


def evaluate_per_sample(
    scorer: Scorer,
    tokenizer,
    data: dict[str, list[dict[str, Any]]],
    config: EvalConfig,
    *,
    forget_split: str,
    retain_split: str | None,
    holdout_split: str | None,
    retain_reference: ReferenceStats | None,
    target_model_utility: float | None,
    device: torch.device | str | None = None,
) -> EvalResult:
    """Reference implementation for the benchmark: one example at a time, one forward per sequence,
    one prompt per generate call, one process. Same outputs as ``evaluate``."""
    ctx = _Context(scorer, tokenizer, replace(config, batch_size=1), _scorer_device(scorer, device), False, 1)
    return _run(ctx, data, forget_split, retain_split, holdout_split, retain_reference, target_model_utility, 0, 1)


def _scorer_device(scorer: Scorer, device: torch.device | str | None) -> torch.device:
    """Where inputs go: ``device`` if given, else that of the first module found in the scorer (or in a
    scorer it wraps, as ULD's composite wraps two), else the CPU."""
    if device is not None:
        return torch.device(device)
    return _module_device(scorer, depth=0) or torch.device("cpu")


def _module_device(obj: Any, depth: int) -> torch.device | None:
    if isinstance(obj, torch.nn.Module):
        return next((p.device for p in obj.parameters()), None)
    if isinstance(obj, Scorer) and depth < 3:
        for value in vars(obj).values():
            found = _module_device(value, depth + 1)
            if found is not None:
                return found
    return None


def _run(ctx, data, forget_split, retain_split, holdout_split, retain_reference, target_mu, rank, world_size):
    qa_splits, generation_splits, names = _plan(data, ctx.tokenizer, ctx.config, forget_split, retain_split,
                                                holdout_split)
    samples: list[dict[str, Any]] = []
    for split in qa_splits:
        for indices, real in shard_batches(len(split.rows), rank, world_size, ctx.config.batch_size):
            for index, sequences in zip(indices[:real], _score_batch(ctx, split, indices)[:real]):
                samples += _rows(split.name, index, _example_values(ctx, split, sequences))
    budgets = [(split.max_new_tokens, split.size) for split in generation_splits]
    for max_new_tokens, members in pack_generation_batches(budgets, rank, world_size, ctx.config.batch_size):
        items = [(generation_splits[position], index) for position, index in members]
        for (split, index), value in zip(items, _generate_batch(ctx, items, max_new_tokens)):
            if value is not None:
                samples += _rows(split.name, index, {split.metric: value})
    samples = _gather(samples, world_size)
    if rank != 0:
        return EvalResult({}, [], None)
    samples.sort(key=lambda row: (row["split"], row["index"], row["metric"]))
    metrics, reference = _aggregate(_by_split_metric(samples), names, ctx.config, retain_reference, target_mu)
    return EvalResult(metrics, samples, reference)


def _rows(split: str, index: int, values: dict[str, float]) -> list[dict[str, Any]]:
    return [{"split": split, "index": index, "metric": metric, "value": float(value)}
            for metric, value in values.items()]


def _plan(data, tokenizer, config: EvalConfig, forget_split, retain_split, holdout_split):
    """Which splits are scored how; returns (teacher-forced splits, generation splits, role → split name)."""
    named = {"forget": forget_split, "retain": retain_split, "holdout": holdout_split}
    for role, name in named.items():
        if name is not None and name not in data:
            raise ValueError(f"{role} split {name!r} is not in the data (have: {', '.join(sorted(data))})")
    if not data[forget_split]:
        raise ValueError(f"forget split {forget_split!r} has no rows")
    text = _is_documents(data[forget_split])
    # MUSE: the forget split is the text VerbMem continues, so that role shares it.
    optional = {"ra": "real_authors", "wf": "world_facts", "text_forget": None if text else "text_forget",
                "knowmem_forget": "knowmem_forget", "knowmem_retain": "knowmem_retain"}
    names = {role: name for role, name in {**named, **optional}.items() if name is not None and data.get(name)}
    if len(set(names.values())) != len(names):
        raise ValueError(f"each evaluated role needs its own split, got {names}")
    qa = _text_splits(data, names, config) if text else _qa_splits(data, names, config)
    if text:
        names["text_forget"] = forget_split
    generation = _generation_splits(data, qa, names, tokenizer, config) if config.generation else []
    return qa, generation, names


def _generation_splits(data, qa: list[_QASplit], names: dict[str, str], tokenizer, config: EvalConfig):
    """TOFU's ROUGE on the question splits, MUSE's VerbMem and KnowMem; adds the ``verbmem`` role to names."""
    generation = [_qa_generation(s.role, s, tokenizer, config, metric="rouge", max_new_tokens=config.max_new_tokens,
                                 similarity=M.rouge_l_recall) for s in qa if s.role != "holdout" and not s.text]
    if data.get(VERBMEM_SPLIT):  # MUSE's prompts and true continuations, as its evaluator scores them
        names["verbmem"] = VERBMEM_SPLIT
        generation.append(_verbmem_prompt_generation(VERBMEM_SPLIT, list(data[VERBMEM_SPLIT]), tokenizer, config))
    elif "text_forget" in names:  # else continue the forget documents' first tokens
        names["verbmem"] = names["text_forget"]
        generation.append(_verbmem_generation(names["text_forget"], list(data[names["text_forget"]]), tokenizer, config))
    for role in ("knowmem_forget", "knowmem_retain"):
        if role in names:
            split = _QASplit(role, names[role], list(data[names[role]]))
            prompt_template = _with_examples(config.template, data.get(KNOWMEM_EXAMPLE_SPLITS[role]) or [])
            generation.append(_qa_generation(role, split, tokenizer, config, prompt_template=prompt_template,
                                             metric="knowmem", max_new_tokens=config.knowmem_new_tokens,
                                             similarity=M.rouge_l_f1, stopwords=KNOWMEM_STOPWORDS))
    return generation


def _is_documents(rows: list[Any]) -> bool:
    """MUSE text rows ({"text"}, no question) rather than question/answer rows."""
    return isinstance(rows[0], dict) and is_document(rows[0])


def _qa_splits(data, names: dict[str, str], config: EvalConfig) -> list[_QASplit]:
    """TOFU: forget (every number), retain (truth ratio), holdout (MIA negatives), utility sets."""
    forget_rows = list(data[names["forget"]])
    qa = [_QASplit("forget", names["forget"], forget_rows, paraphrase=True, perturbed=True, memorisation=True, mia=True)]
    if "retain" in names:
        names["retain"], retain_rows = _retain_evaluation_rows(data, names["retain"], config, len(forget_rows))
        qa.append(_QASplit("retain", names["retain"], retain_rows, paraphrase=True, perturbed=True))
    if "holdout" in names:
        qa.append(_QASplit("holdout", names["holdout"], list(data[names["holdout"]]), mia=True))
    for role in ("ra", "wf"):
        if role in names:
            qa.append(_QASplit(role, names[role], list(data[names[role]]), perturbed=True))
    return qa


def _text_splits(data, names: dict[str, str], config: EvalConfig) -> list[_QASplit]:
    """MUSE: documents scored teacher-forced on every token; forget vs holdout gives the MIA AUCs
    (privleak), retain only its probability (as many documents as the forget split, or retain_eval_size)."""
    forget_rows = list(data[names["forget"]])
    qa = [_QASplit("forget", names["forget"], forget_rows, mia=True, text=True)]
    if "retain" in names:
        retain_rows = list(data[names["retain"]])[:config.retain_eval_size or len(forget_rows)]
        qa.append(_QASplit("retain", names["retain"], retain_rows, text=True))
    if "holdout" in names:
        qa.append(_QASplit("holdout", names["holdout"], list(data[names["holdout"]]), mia=True, text=True))
    return qa


def _retain_evaluation_rows(data, retain_split: str, config: EvalConfig, forget_size: int):
    """TOFU's retain metrics use its ``retain_perturbed`` set (the retain splits carry no paraphrases or
    wrong answers), whole as in the reference; without it, the first rows of the retain split, as many
    as the forget split has. ``retain_eval_size`` caps either."""
    if data.get(RETAIN_PERTURBED):
        return RETAIN_PERTURBED, list(data[RETAIN_PERTURBED])[:config.retain_eval_size]
    return retain_split, list(data[retain_split])[:config.retain_eval_size or forget_size]


def _by_split_metric(samples: list[dict[str, Any]]) -> dict[tuple[str, str], np.ndarray]:
    """(split, metric) → values in index order (samples arrive sorted by split, index, metric)."""
    grouped: dict[tuple[str, str], list[float]] = {}
    for row in samples:
        grouped.setdefault((row["split"], row["metric"]), []).append(row["value"])
    return {key: np.asarray(values, dtype=np.float64) for key, values in grouped.items()}


def _aggregate(values, names, config: EvalConfig, retain_reference, target_mu):
    """Aggregate metrics (every METRIC_COLUMNS key; None where not computable) and ReferenceStats."""

    def get(role: str, metric: str) -> np.ndarray | None:
        found = values.get((names.get(role, ""), metric))
        return found if found is not None and found.size else None

    def mean(role: str, metric: str) -> float | None:
        found = get(role, metric)
        return None if found is None else float(found.mean())

    metrics: dict[str, float | None] = {name: None for name in METRIC_COLUMNS}
    forget_tr = get("forget", "truth_ratio")  # None on MUSE text: no forget quality
    metrics.update(
        forget_truth_ratio=None if forget_tr is None else M.forget_truth_ratio_score(forget_tr),
        forget_prob=mean("forget", "prob"), forget_rouge=mean("forget", "rouge"),
        retain_prob=mean("retain", "prob"), retain_rouge=mean("retain", "rouge"),
        ra_prob=mean("ra", "normalised_prob"), ra_rouge=mean("ra", "rouge"),
        wf_prob=mean("wf", "normalised_prob"), wf_rouge=mean("wf", "rouge"),
        extraction_strength=mean("forget", "extraction_strength"),
        exact_memorization=mean("forget", "exact_memorization"),
        verbmem_forget=mean("verbmem", "verbmem"),
        knowmem_forget=mean("knowmem_forget", "knowmem"), knowmem_retain=mean("knowmem_retain", "knowmem"),
    )
    for role in ("retain", "ra", "wf"):
        ratios = get(role, "truth_ratio")
        metrics[f"{role}_truth_ratio"] = None if ratios is None else M.utility_truth_ratio_score(ratios)
    utility = [metrics[f"{role}_{kind}"] for role in ("retain", "ra", "wf") for kind in ("prob", "rouge", "truth_ratio")]
    if all(v is not None for v in utility):
        metrics["model_utility"] = M.model_utility(utility)
    elif forget_tr is None:  # MUSE's utility: KnowMem on retain questions (compare.py ranks on it too)
        metrics["model_utility"] = metrics["knowmem_retain"]
    if metrics["model_utility"] is not None and target_mu:
        metrics["utility_loss"] = 1.0 - metrics["model_utility"] / target_mu
    if retain_reference is not None and forget_tr is not None:
        metrics["forget_quality"] = M.forget_quality(forget_tr, retain_reference.forget_truth_ratios)
    mia_auc = {}
    for attack in MIA_ATTACKS:
        forget_scores, holdout_scores = get("forget", f"mia_{attack}"), get("holdout", f"mia_{attack}")
        if forget_scores is not None and holdout_scores is not None:
            mia_auc[attack] = metrics[f"mia_{attack}_auc"] = M.auc(forget_scores, holdout_scores)
    if config.privleak_attack in mia_auc:
        # Without the retain model's AUC the reference compares against 0.5 (its `ref_value`).
        retain_auc = (retain_reference.mia_auc.get(config.privleak_attack, 0.5) if retain_reference else 0.5)
        metrics["privleak"] = M.privleak(mia_auc[config.privleak_attack], retain_auc)
    return metrics, ReferenceStats([float(v) for v in forget_tr] if forget_tr is not None else [], mia_auc)
