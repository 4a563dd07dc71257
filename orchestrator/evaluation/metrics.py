"""TOFU and MUSE metrics as pure functions over numbers: no model, no torch.

Every definition follows the reference evaluator (open-unlearning at commit d3d7cf9,
``src/evals/metrics``); where it has a quirk that moves numbers, the quirk is kept and said so,
because two evaluators that differ there disagree by far more than rounding. The small ``1e-10``
terms are the reference's own guards against division by zero and are kept for the same reason.

Conventions for the per-sequence inputs (the suite produces them from one teacher-forced pass):
``token_logprobs`` are log p(y_t | x, y_<t) of the answer tokens after the prompt mask;
``correct`` says, per answer token, whether the argmax of the logits equals the label.
"""
from __future__ import annotations

import zlib
from functools import lru_cache
from typing import Sequence

import numpy as np
from scipy import stats

_EPS = 1e-10  # the reference's guard in every ratio below


# ----------------------------------------------------------------- probabilities and truth ratio
def length_normalised_probability(token_logprobs: np.ndarray) -> float:
    """p = exp(−mean answer-token NLL) = exp(mean log p(y_t|…)) (TOFU's "probability")."""
    token_logprobs = np.asarray(token_logprobs, dtype=np.float64)
    if token_logprobs.size == 0:
        raise ValueError("a sequence needs at least one answer token to have a probability")
    return float(np.exp(token_logprobs.mean()))


def normalised_probability(p_true: np.ndarray, p_perturbed: np.ndarray) -> np.ndarray:
    """Real authors / world facts: p_true / (p_true + Σ_j p_perturbed_j), per example.

    p_true: [n] length-normalised probability of the answer; p_perturbed: [n, k] of the wrong options.
    """
    p_true = np.asarray(p_true, dtype=np.float64)
    p_perturbed = _as_matrix(p_perturbed, len(p_true))
    return p_true / (p_true + p_perturbed.sum(axis=1) + _EPS)


def truth_ratio(p_wrong_normalised: np.ndarray, p_correct_normalised: np.ndarray) -> np.ndarray:
    """TR = geometric mean over the k perturbed answers of their probabilities / p_correct, per example.

    p_wrong_normalised: [n, k]; p_correct_normalised: [n] ("correct" = paraphrased answer on forget and
    retain, the answer itself on real authors / world facts). The geometric mean of exp(−loss_j) equals
    the reference's exp(−mean_j loss_j).
    """
    p_correct = np.asarray(p_correct_normalised, dtype=np.float64)
    p_wrong = _as_matrix(p_wrong_normalised, len(p_correct))
    with np.errstate(divide="ignore"):  # a probability that underflowed to 0 gives a geometric mean of 0
        geometric_mean = np.exp(np.log(p_wrong).mean(axis=1))
    return geometric_mean / (p_correct + _EPS)


def prob_mean_truth(p_wrong_normalised: np.ndarray, p_correct_normalised: np.ndarray) -> np.ndarray:
    """The ``prob_mean`` truth value per example (open-unlearning #163): P_c / (P_c + P_w), P_w the geometric
    mean of the perturbed answers' probabilities; in (0, 1), higher = the correct answer preferred."""
    p_correct = np.asarray(p_correct_normalised, dtype=np.float64)
    p_wrong = truth_ratio(p_wrong_normalised, p_correct) * (p_correct + _EPS)  # the geometric mean back
    return p_correct / (p_correct + p_wrong + _EPS)


def forget_truth_ratio_score(ratios: np.ndarray) -> float:
    """Forget set aggregate: mean(min(TR, 1/TR)); 1 when wrong and correct answers are equally likely."""
    ratios = _nonempty(ratios, "truth ratios")
    return float(np.mean(np.minimum(ratios, 1.0 / (ratios + _EPS))))


def utility_truth_ratio_score(ratios: np.ndarray) -> float:
    """Retain / real authors / world facts aggregate: mean(max(0, 1 − TR)); higher = truth preferred."""
    ratios = _nonempty(ratios, "truth ratios")
    return float(np.mean(np.maximum(0.0, 1.0 - ratios)))


def forget_quality(truth_ratios_unlearned: Sequence[float], truth_ratios_retain: Sequence[float]) -> float:
    """p-value of the two-sample KS test between the forget-set truth ratios of the unlearned model and
    of the retain model (never trained on the forget set); 1 = indistinguishable."""
    unlearned = _nonempty(truth_ratios_unlearned, "unlearned truth ratios")
    retain = _nonempty(truth_ratios_retain, "retain-model truth ratios")
    return float(stats.ks_2samp(unlearned, retain).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean of the nine utility numbers ({prob, ROUGE, truth ratio} × {retain, real authors,
    world facts}); 0 as soon as one of them is 0 (scipy's hmean convention)."""
    values = _nonempty(values, "utility values")
    if np.any(values < 0) or not np.all(np.isfinite(values)):
        raise ValueError(f"model utility needs finite non-negative values, got {values.tolist()}")
    if np.any(values == 0):
        return 0.0
    return float(stats.hmean(values))


# ----------------------------------------------------------------- text similarity
@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(generated: str, answer: str) -> float:
    """ROUGE-L recall of a generation against the reference answer (TOFU's ROUGE)."""
    return float(_rouge_scorer().score(answer, generated)["rougeL"].recall)


def rouge_l_f1(generated: str, answer: str) -> float:
    """ROUGE-L F1 of a generation against the reference text (MUSE's VerbMem and KnowMem)."""
    return float(_rouge_scorer().score(answer, generated)["rougeL"].fmeasure)


# ----------------------------------------------------------------- memorisation
def extraction_strength(correct: Sequence[bool]) -> float:
    """ES = 1 − k/|y| for the smallest k whose suffix y[k:] is predicted exactly (teacher forced).

    ``correct``: per answer token (EOS excluded) whether the argmax prediction equals the label.
    The reference only tries k = 0 … |y|−1 and keeps the loop's last k when no suffix matches, so an
    answer whose last token is wrong scores 1/|y|, not 0; kept for parity. An empty answer scores 0.
    """
    correct = np.asarray(correct, dtype=bool)
    length = correct.size
    if length == 0:
        return 0.0
    # The suffix from k is exact iff every flag from k on is true: k = 1 + index of the last wrong token.
    wrong = np.flatnonzero(~correct)
    k = 0 if wrong.size == 0 else min(int(wrong[-1]) + 1, length - 1)
    return 1.0 - k / length


def exact_memorization(correct: Sequence[bool]) -> float | None:
    """EM = fraction of answer tokens (EOS excluded) whose argmax prediction equals the label; None for an
    empty answer (the reference leaves such examples out of the mean)."""
    correct = np.asarray(correct, dtype=bool)
    return float(correct.mean()) if correct.size else None


# ----------------------------------------------------------------- membership inference scores
# Every score below is "loss-like": LOWER means the sequence looks MORE like a training member.
def loss_score(token_logprobs: np.ndarray) -> float:
    """LOSS attack: mean answer-token NLL. Reference parity: computed on the same tokens as the
    probability, i.e. EOS included."""
    return float(-np.mean(np.asarray(token_logprobs, dtype=np.float64)))


def gradient_norm_score(gradient_norms: Sequence[float]) -> float:
    """GradNorm attack: the mean over parameter tensors of ‖∂ loss / ∂θ‖₂ for one example (lower = member)."""
    return float(np.mean(_nonempty(gradient_norms, "gradient norms")))


def zlib_score(token_logprobs: np.ndarray, text: str) -> float:
    """ZLib attack: mean NLL (EOS included, as LOSS) / length in bytes of zlib.compress(text as UTF-8);
    ``text`` is the decoded answer tokens (special tokens skipped)."""
    return loss_score(token_logprobs) / len(zlib.compress(text.encode("utf-8")))


def min_k_score(values: np.ndarray, k: float) -> float:
    """Min-k%: −mean of the lowest max(1, ⌊k·n⌋) values (token log-probs, EOS excluded); 0 for n = 0."""
    if not 0 < k <= 1:
        raise ValueError(f"min-k fraction must be in (0, 1], got {k}")
    values = np.sort(np.asarray(values, dtype=np.float64))
    if values.size == 0:
        return 0.0
    count = max(1, int(values.size * k))
    return float(-np.mean(values[:count]))


def min_k_plus_plus_score(z_scores: np.ndarray, k: float) -> float:
    """Min-k%++: Min-k% over z_t = (log p(y_t) − μ_t)/σ_t, where μ_t = Σ_v p_v log p_v and
    σ_t² = max(Σ_v p_v (log p_v)² − μ_t², 1e-6) over the vocabulary at position t (the suite computes
    z on device; see ``minkpp_z_scores`` for the transcription)."""
    return min_k_score(z_scores, k)


def minkpp_z_scores(token_logprobs: np.ndarray, vocab_logprobs: np.ndarray) -> np.ndarray:
    """z_t of Min-k%++ from [n] label log-probs and [n, V] full log-softmax rows (float64 reference)."""
    vocab_logprobs = np.asarray(vocab_logprobs, dtype=np.float64)
    probs = np.exp(vocab_logprobs)
    mu = (probs * vocab_logprobs).sum(-1)
    variance = np.maximum((probs * vocab_logprobs**2).sum(-1) - mu**2, 1e-6)
    return (np.asarray(token_logprobs, dtype=np.float64) - mu) / np.sqrt(variance)


def auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """Membership-inference AUC with the forget set as the positive class, for loss-like scores.

    AUC = P(score_forget < score_holdout) + ½·P(tie), i.e. the ROC AUC of the negated scores
    (lower score = "member"). 1: forget data clearly recognised as seen; 0.5: indistinguishable from
    unseen holdout data. Equal to the reference's roc_auc_score(labels forget=0 / holdout=1, scores).
    Computed as the Mann–Whitney U of the holdout scores over the forget scores, divided by n₁·n₂.
    """
    forget = _nonempty(forget_scores, "forget scores")
    holdout = _nonempty(holdout_scores, "holdout scores")
    u_holdout = stats.mannwhitneyu(holdout, forget, alternative="two-sided").statistic
    return float(u_holdout / (forget.size * holdout.size))


def privleak(auc_unlearned: float, auc_retain: float) -> float:
    """MUSE's PrivLeak in percent: (AUC'_unlearned − AUC'_retain) / AUC'_retain × 100, 0 ideal.

    MUSE states AUCs the other way round (AUC' = 1 − ``auc`` above), and so does the reference, which
    converts before dividing: a model that still knows the forget set (``auc`` near 1) scores near
    −100 against a retain model at 0.5, as the target models in MUSE's tables do; over-unlearning is
    positive.
    """
    for name, value in (("auc_unlearned", auc_unlearned), ("auc_retain", auc_retain)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be an AUC in [0, 1], got {value}")
    unlearned, retain = 1.0 - auc_unlearned, 1.0 - auc_retain
    return (unlearned - retain) / (retain + _EPS) * 100.0


# ----------------------------------------------------------------- input checks
def _nonempty(values: Sequence[float], what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{what}: need at least one value")
    return array


def _as_matrix(values: np.ndarray, rows: int) -> np.ndarray:
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != rows or matrix.shape[1] == 0:
        raise ValueError(f"expected [n={rows}, k≥1] perturbed probabilities, got shape {matrix.shape}")
    return matrix
