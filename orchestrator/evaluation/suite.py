"""The evaluation suite: every TOFU and MUSE metric of one model, batched and sharded over a gang.

This module plans which split is scored how, runs the plan and aggregates. Per split, examples go through
the scorer in batches: one teacher-forced forward per batch gives every probability-based number
(teacher_forced.py); ROUGE, VerbMem and KnowMem come from batched greedy decoding (generation.py).

Sharding (sharding.py): rank r takes examples r, r + W, r + 2W, … of every split; every rank runs the same
number of forwards (ZeRO-3's are collective). Per-example values are gathered on rank 0 and every
aggregate is computed from them in index order, so one worker and N workers give the same numbers.
Metric definitions: ``metrics.py`` (reference: open-unlearning).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from orchestrator.data import KNOWMEM_EXAMPLE_SPLITS, VERBMEM_SPLIT, is_document
from orchestrator.data.validation import RETAIN_PERTURBED
from orchestrator.evaluation import metrics as M
from orchestrator.evaluation.config import MIA_ATTACKS, EvalConfig, EvalContext
from orchestrator.evaluation.generation import (
    KNOWMEM_STOPWORDS,
    generate_batch,
    qa_generation,
    verbmem_generation,
    verbmem_prompt_generation,
    with_examples,
)
from orchestrator.evaluation.gradnorm import gradient_norm
from orchestrator.evaluation.scorer import Scorer
from orchestrator.evaluation.sharding import (
    gather_rows,
    pack_generation_batches,
    shard_batches,
)
from orchestrator.evaluation.teacher_forced import QASplit, example_values, score_batch
from orchestrator.results import METRIC_COLUMNS


@dataclass
class ReferenceStats:
    """What a later run needs from this model when it serves as the retain model."""

    forget_truth_ratios: list[float]  # per forget example, index order (forget quality's KS sample)
    mia_auc: dict[str, float] = field(default_factory=dict)  # attack name → AUC (privleak's reference)
    # per-example mean NLL on forget and holdout, index order: the Reference MIA subtracts them
    mia_losses: dict[str, list[float]] = field(default_factory=dict)

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
                   {str(k): float(v) for k, v in data.get("mia_auc", {}).items()},
                   {str(k): [float(x) for x in v] for k, v in data.get("mia_losses", {}).items()})


@dataclass
class EvalResult:
    metrics: dict[str, float | None]  # keys: results.METRIC_COLUMNS (rank 0; empty on other ranks)
    samples: list[dict[str, Any]]  # rows {split, index, metric, value}, one per per-example number
    reference: ReferenceStats | None  # this model's stats as a retain reference (rank 0)
    not_measured: dict[str, str] = field(default_factory=dict)  # metric → why it is None (rank 0)


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
    ctx = EvalContext(scorer, tokenizer, config, _scorer_device(scorer, device), world_size > 1, None)
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
    ctx = EvalContext(scorer, tokenizer, replace(config, batch_size=1), _scorer_device(scorer, device), False, 1)
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
            for index, sequences in zip(indices[:real], score_batch(ctx, split, indices)[:real]):
                samples += _rows(split.name, index, example_values(ctx, split, sequences))
    if ctx.config.gradnorm:  # a forward and backward per example; equal counts per rank, as everywhere else
        for split in (s for s in qa_splits if s.mia):
            for indices, real in shard_batches(len(split.rows), rank, world_size, 1):
                value = gradient_norm(ctx, split, indices[0])
                if real:
                    samples += _rows(split.name, indices[0], {"mia_gradnorm": value})
    budgets = [(split.max_new_tokens, split.size) for split in generation_splits]
    for max_new_tokens, members in pack_generation_batches(budgets, rank, world_size, ctx.config.batch_size):
        items = [(generation_splits[position], index) for position, index in members]
        for (split, index), value in zip(items, generate_batch(ctx, items, max_new_tokens)):
            if value is not None:
                samples += _rows(split.name, index, {split.metric: value})
    samples = gather_rows(samples, world_size)
    if rank != 0:
        return EvalResult({}, [], None)
    samples.sort(key=lambda row: (row["split"], row["index"], row["metric"]))
    metrics, reference = _aggregate(_by_split_metric(samples), names, ctx.config, retain_reference, target_mu)
    reasons = unmeasured_reasons(metrics, names, ctx.config, retain_reference is not None, target_mu)
    return EvalResult(metrics, samples, reference, reasons)


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
    utility = config.utility_sets
    optional = {"ra": "real_authors" if utility else None, "wf": "world_facts" if utility else None,
                "text_forget": None if text else "text_forget",
                "knowmem_forget": "knowmem_forget", "knowmem_retain": "knowmem_retain"}
    names = {role: name for role, name in {**named, **optional}.items() if name is not None and data.get(name)}
    if len(set(names.values())) != len(names):
        raise ValueError(f"each evaluated role needs its own split, got {names}")
    qa = _text_splits(data, names, config) if text else _qa_splits(data, names, config)
    if text:
        names["text_forget"] = forget_split
    generation = _generation_splits(data, qa, names, tokenizer, config) if config.generation else []
    return qa, generation, names


def _generation_splits(data, qa: list[QASplit], names: dict[str, str], tokenizer, config: EvalConfig):
    """TOFU's ROUGE on the question splits, MUSE's VerbMem and KnowMem; adds the ``verbmem`` role to names."""
    generation = [qa_generation(s.role, s, tokenizer, config, metric="rouge", max_new_tokens=config.max_new_tokens,
                                 similarity=M.rouge_l_recall) for s in qa if s.role != "holdout" and not s.text]
    if data.get(VERBMEM_SPLIT):  # MUSE's prompts and true continuations, as its evaluator scores them
        names["verbmem"] = VERBMEM_SPLIT
        generation.append(verbmem_prompt_generation(VERBMEM_SPLIT, list(data[VERBMEM_SPLIT]), tokenizer, config))
    elif "text_forget" in names:  # else continue the forget documents' first tokens
        names["verbmem"] = names["text_forget"]
        generation.append(verbmem_generation(names["text_forget"], list(data[names["text_forget"]]), tokenizer, config))
    for role in ("knowmem_forget", "knowmem_retain"):
        if role in names:
            split = QASplit(role, names[role], list(data[names[role]]))
            prompt_template = with_examples(config.template, data.get(KNOWMEM_EXAMPLE_SPLITS[role]) or [])
            generation.append(qa_generation(role, split, tokenizer, config, prompt_template=prompt_template,
                                             metric="knowmem", max_new_tokens=config.knowmem_new_tokens,
                                             similarity=M.rouge_l_f1, stopwords=KNOWMEM_STOPWORDS))
    return generation


def _is_documents(rows: list[Any]) -> bool:
    """MUSE text rows ({"text"}, no question) rather than question/answer rows."""
    return isinstance(rows[0], dict) and is_document(rows[0])


def _qa_splits(data, names: dict[str, str], config: EvalConfig) -> list[QASplit]:
    """TOFU: forget (every number), retain (truth ratio), holdout (MIA negatives), utility sets."""
    forget_rows = list(data[names["forget"]])
    qa = [QASplit("forget", names["forget"], forget_rows, paraphrase=True, perturbed=True, memorisation=True, mia=True)]
    if "retain" in names:
        names["retain"], retain_rows = _retain_evaluation_rows(data, names["retain"], config, len(forget_rows))
        qa.append(QASplit("retain", names["retain"], retain_rows, paraphrase=True, perturbed=True))
    if "holdout" in names:
        qa.append(QASplit("holdout", names["holdout"], list(data[names["holdout"]]), mia=True))
    for role in ("ra", "wf"):
        if role in names:
            qa.append(QASplit(role, names[role], list(data[names[role]]), perturbed=True))
    return qa


def _text_splits(data, names: dict[str, str], config: EvalConfig) -> list[QASplit]:
    """MUSE: documents scored teacher-forced on every token; forget vs holdout gives the MIA AUCs
    (privleak), retain only its probability (as many documents as the forget split, or retain_eval_size)."""
    forget_rows = list(data[names["forget"]])
    qa = [QASplit("forget", names["forget"], forget_rows, mia=True, text=True)]
    if "retain" in names:
        retain_rows = list(data[names["retain"]])[:config.retain_eval_size or len(forget_rows)]
        qa.append(QASplit("retain", names["retain"], retain_rows, text=True))
    if "holdout" in names:
        qa.append(QASplit("holdout", names["holdout"], list(data[names["holdout"]]), mia=True, text=True))
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
    metrics.update(
        forget_prob=mean("forget", "prob"), forget_rouge=mean("forget", "rouge"),
        retain_prob=mean("retain", "prob"), retain_rouge=mean("retain", "rouge"),
        ra_prob=mean("ra", "normalised_prob"), ra_rouge=mean("ra", "rouge"),
        wf_prob=mean("wf", "normalised_prob"), wf_rouge=mean("wf", "rouge"),
        extraction_strength=mean("forget", "extraction_strength"),
        exact_memorization=mean("forget", "exact_memorization"),
        verbmem_forget=mean("verbmem", "verbmem"),
        knowmem_forget=mean("knowmem_forget", "knowmem"), knowmem_retain=mean("knowmem_retain", "knowmem"),
    )
    forget_values = _truth_metrics(get, config, metrics)  # None on MUSE text: no truth ratio, no forget quality
    utility = [metrics[f"{role}_{kind}"] for role in ("retain", "ra", "wf") for kind in ("prob", "rouge", "truth_ratio")]
    if all(v is not None for v in utility):
        metrics["model_utility"] = M.model_utility(utility)
    elif forget_values is None:  # MUSE's utility: KnowMem on retain questions (compare.py ranks on it too)
        metrics["model_utility"] = metrics["knowmem_retain"]
    if metrics["model_utility"] is not None and target_mu:
        metrics["utility_loss"] = 1.0 - metrics["model_utility"] / target_mu
    if retain_reference is not None and forget_values is not None:
        metrics["forget_quality"] = M.forget_quality(forget_values, retain_reference.forget_truth_ratios)
    mia_auc, losses = _mia_metrics(get, config, retain_reference, metrics)
    return metrics, ReferenceStats([float(v) for v in forget_values] if forget_values is not None else [], mia_auc,
                                   losses)


def _truth_metrics(get, config: EvalConfig, metrics: dict[str, float | None]) -> np.ndarray | None:
    """The truth-ratio aggregates, as ``truth_ratio_aggregator`` says; returns the forget set's per-example
    values (forget quality's KS sample), or None without wrong answers."""
    if config.truth_ratio_aggregator == "prob_mean":
        for role in ("forget", "retain", "ra", "wf"):
            found = get(role, "prob_mean_truth")
            metrics[f"{role}_truth_ratio"] = None if found is None else float(found.mean())
        return get("forget", "prob_mean_truth")
    forget = get("forget", "truth_ratio")
    metrics["forget_truth_ratio"] = None if forget is None else M.forget_truth_ratio_score(forget)
    for role in ("retain", "ra", "wf"):
        ratios = get(role, "truth_ratio")
        metrics[f"{role}_truth_ratio"] = None if ratios is None else M.utility_truth_ratio_score(ratios)
    return forget


def _mia_metrics(get, config: EvalConfig, retain_reference, metrics: dict[str, float | None]):
    """Forget-vs-holdout AUCs of every attack, privleak against the retain model's AUC, and the Reference
    attack (loss minus the retain model's loss on the same example). Returns (AUCs, per-example losses)."""
    mia_auc = {}
    for attack in (*MIA_ATTACKS, "gradnorm"):
        forget_scores, holdout_scores = get("forget", f"mia_{attack}"), get("holdout", f"mia_{attack}")
        if forget_scores is not None and holdout_scores is not None:
            mia_auc[attack] = metrics[f"mia_{attack}_auc"] = M.auc(forget_scores, holdout_scores)
    if config.privleak_attack in mia_auc and retain_reference and config.privleak_attack in retain_reference.mia_auc:
        # Without the retain model's AUC there is nothing to compare with: privleak stays None (the reference
        # evaluator substitutes 0.5, a number nobody measured).
        metrics["privleak"] = M.privleak(mia_auc[config.privleak_attack], retain_reference.mia_auc[config.privleak_attack])
    losses = {role: [float(v) for v in found] for role in ("forget", "holdout")
              if (found := get(role, "mia_loss")) is not None}
    reference = retain_reference.mia_losses if retain_reference else {}
    if len(losses) == 2 and all(len(reference.get(role, ())) == len(losses[role]) for role in losses):
        difference = {role: np.asarray(losses[role]) - np.asarray(reference[role]) for role in losses}
        metrics["mia_reference_auc"] = M.auc(difference["forget"], difference["holdout"])
    return mia_auc, losses


# Metrics that need question/answer rows with wrong answers (TOFU): MUSE's documents have none.
_TRUTH_RATIO_METRICS = ("forget_quality", "forget_truth_ratio", "retain_truth_ratio", "ra_prob", "ra_rouge",
                        "ra_truth_ratio", "wf_prob", "wf_rouge", "wf_truth_ratio", "extraction_strength",
                        "exact_memorization", "forget_rouge", "retain_rouge")
_GENERATION_METRICS = ("forget_rouge", "retain_rouge", "ra_rouge", "wf_rouge", "verbmem_forget", "knowmem_forget",
                       "knowmem_retain", "model_utility")
_SPLIT_OF = {"ra": "real_authors", "wf": "world_facts", "retain": "the retain split", "holdout": "the holdout split"}


def unmeasured_reasons(metrics: dict[str, float | None], names: dict[str, str], config: EvalConfig,
                       has_retain_reference: bool, target_mu: float | None) -> dict[str, str]:
    """Why each metric that came out None was not measured (the evals row carries this, not a stand-in)."""
    text = "text_forget" in names and names.get("text_forget") == names.get("forget")
    reasons = {}
    for metric in (m for m, value in metrics.items() if value is None):
        role = metric.split("_")[0]
        if text and metric in _TRUTH_RATIO_METRICS:
            reasons[metric] = "MUSE data (documents) has no wrong answers to score truth ratios on"
        elif not config.generation and metric in _GENERATION_METRICS:
            reasons[metric] = "evaluation.generation is false (no greedy answers to score)"
        elif role in ("ra", "wf") and not config.utility_sets:
            reasons[metric] = "evaluation.utility_sets is false (real authors / world facts not scored)"
        elif metric == "model_utility" and not config.utility_sets and not text:
            reasons[metric] = "evaluation.utility_sets is false (it needs the real-authors and world-facts scores)"
        elif role in _SPLIT_OF and role not in names:
            reasons[metric] = f"no {_SPLIT_OF[role]} in the data"
        elif metric in ("forget_quality", "privleak") and not has_retain_reference:
            reasons[metric] = "no retain model to compare with (model.retain)"
        elif metric == "model_utility":
            reasons[metric] = "needs retain, real_authors and world_facts scores (TOFU) or knowmem_retain (MUSE)"
        elif metric == "utility_loss":
            reasons[metric] = ("the target's model utility is 0" if target_mu == 0 else
                               "no target model utility to compare with" if metrics["model_utility"] is not None
                               else "model utility not measured")
        elif metric == "mia_gradnorm_auc" and not config.gradnorm:
            reasons[metric] = "evaluation.gradnorm is false (or ZeRO-3 weights were not gathered)"
        elif metric == "mia_reference_auc" and not has_retain_reference:
            reasons[metric] = "no retain model to compare losses with (model.retain)"
        elif metric.startswith("mia_") or metric == "privleak":
            reasons[metric] = "needs forget and holdout splits with scores" if "holdout" in names else "no holdout split"
        elif metric.startswith(("verbmem", "knowmem")):
            reasons[metric] = f"no {metric.split('_')[0]} split in the data"
        else:
            reasons[metric] = "not computable from the splits this evaluation scored"
    return reasons
