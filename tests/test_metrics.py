"""Every metric of orchestrator/evaluation/metrics.py on tiny inputs whose values are worked out by hand
(in the comments) or by a float64 direct transcription of the definition in the test."""
from __future__ import annotations

import itertools
import math
import zlib

import numpy as np
import pytest

from orchestrator.evaluation import metrics as M


# ----------------------------------------------------------------- probabilities and truth ratio
def test_length_normalised_probability_is_exp_of_mean_logprob():
    # log-probs −1, −2, −3: mean −2 → e^−2.
    assert M.length_normalised_probability(np.array([-1.0, -2.0, -3.0])) == pytest.approx(math.exp(-2.0), rel=1e-12)
    with pytest.raises(ValueError):
        M.length_normalised_probability(np.array([]))


def test_truth_ratio_is_geometric_mean_of_wrong_over_correct():
    # Row 0: (0.25 · 0.0625 · 0.125)^(1/3) = (2^-2 · 2^-4 · 2^-3)^(1/3) = 2^-3 = 0.125, / 0.5 = 0.25.
    # Row 1: 0.1 / 0.1 = 1. Row 2: (0.8 · 0.2 · 0.5)^(1/3) / 0.2.
    wrong = np.array([[0.25, 0.0625, 0.125], [0.1, 0.1, 0.1], [0.8, 0.2, 0.5]])
    correct = np.array([0.5, 0.1, 0.2])
    expected = np.array([0.125 / 0.5, 1.0, (0.8 * 0.2 * 0.5) ** (1 / 3) / 0.2])
    np.testing.assert_allclose(M.truth_ratio(wrong, correct), expected, rtol=1e-8)


def test_truth_ratio_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        M.truth_ratio(np.array([0.1, 0.2]), np.array([0.5, 0.5]))  # wrong must be [n, k]
    with pytest.raises(ValueError):
        M.truth_ratio(np.ones((3, 2)), np.ones(2))


def test_truth_ratio_aggregates():
    ratios = np.array([0.25, 4.0, 1.0])
    # forget: min(TR, 1/TR) = 0.25, 0.25, 1 → mean 0.5.
    assert M.forget_truth_ratio_score(ratios) == pytest.approx(0.5, rel=1e-8)
    # utility: max(0, 1 − TR) = 0.75, 0, 0 → mean 0.25.
    assert M.utility_truth_ratio_score(ratios) == pytest.approx(0.25, rel=1e-12)


def test_normalised_probability():
    # 0.6 / (0.6 + 0.1 + 0.2) = 2/3; 0.2 / (0.2 + 0.2 + 0.4) = 1/4.
    got = M.normalised_probability(np.array([0.6, 0.2]), np.array([[0.1, 0.2], [0.2, 0.4]]))
    np.testing.assert_allclose(got, [2 / 3, 0.25], rtol=1e-9)


# ----------------------------------------------------------------- forget quality and model utility
def test_forget_quality_hand_case():
    # Completely separated samples of 3 and 3: D = 1; the exact two-sided p-value is the share of the
    # C(6,3) = 20 equally likely orderings that separate the groups completely (2 of them) = 0.1.
    assert M.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1, rel=1e-9)
    # Identical samples: D = 0, p = 1.
    assert M.forget_quality([0.3, 0.5, 0.9], [0.3, 0.5, 0.9]) == pytest.approx(1.0)


def test_forget_quality_overlapping_samples_by_hand():
    # a = 1, 2, 4 and b = 3, 5, 6: merged order a a b a b b, so #a − #b along it is 1 2 1 2 1 0 and
    # D = 2/3. Of the C(6, 3) = 20 equally likely orders, the 8 that never lead by 2 are the three-fold
    # choices of "ab" or "ba" (2³); the other 12 reach D ≥ 2/3: p = 12/20 = 0.6.
    assert M.forget_quality([1.0, 2.0, 4.0], [3.0, 5.0, 6.0]) == pytest.approx(0.6, rel=1e-9)
    # Interleaved a b a b a b: D = 1/3, which every order reaches (its first element alone): p = 1.
    assert M.forget_quality([1.0, 3.0, 5.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0, rel=1e-9)


def _exact_ks_pvalue(a: list[float], b: list[float]) -> float:
    """Two-sided exact KS p-value by enumeration: under the null every assignment of n of the n + m
    pooled (distinct) values to the first sample is equally likely; p = share with D ≥ the observed D."""
    pooled = sorted(a + b)
    n, m = len(a), len(b)

    def statistic(first: set[int]) -> float:
        # max over the pooled order of |F_a − F_b|, in units of 1/(n·m) to keep it an integer
        seen_a = seen_b = 0
        largest = 0
        for position in range(n + m):
            if position in first:
                seen_a += 1
            else:
                seen_b += 1
            largest = max(largest, abs(seen_a * m - seen_b * n))
        return largest

    observed = statistic({pooled.index(x) for x in a})
    splits = list(itertools.combinations(range(n + m), n))
    return sum(statistic(set(split)) >= observed for split in splits) / len(splits)


def test_forget_quality_equals_the_enumerated_exact_pvalue_for_unequal_sizes():
    # 5 vs 7 truth-ratio-like values (C(12, 5) = 792 orders enumerated), then 4 vs 6 (210).
    rng = np.random.default_rng(0)
    for n, m, shift in ((5, 7, 0.8), (4, 6, 0.3)):
        a, b = list(rng.lognormal(size=n)), list(rng.lognormal(shift, size=m))
        assert len(set(a + b)) == n + m  # no ties, as for continuous truth ratios
        assert M.forget_quality(a, b) == pytest.approx(_exact_ks_pvalue(a, b), rel=1e-9)


def test_model_utility_harmonic_mean():
    # 3 / (1/1 + 1/0.5 + 1/0.25) = 3/7.
    assert M.model_utility([1.0, 0.5, 0.25]) == pytest.approx(3 / 7, rel=1e-12)
    # Nine values with easy reciprocals: 2 + 4 + 1 + 5 + 2 + 4 + 10 + 1 + 2 = 31 → 9/31.
    values = [0.5, 0.25, 1.0, 0.2, 0.5, 0.25, 0.1, 1.0, 0.5]
    assert M.model_utility(values) == pytest.approx(9 / 31, rel=1e-12)
    assert M.model_utility(values[:-1] + [0.0]) == 0.0
    with pytest.raises(ValueError):
        M.model_utility([0.5, -0.1])


# ----------------------------------------------------------------- ROUGE
def test_rouge_l_recall_and_f1():
    # Reference "the cat sat on the mat" (6 words), generation "the cat sat": LCS 3 → recall 3/6,
    # precision 3/3, F1 = 2·0.5·1/1.5 = 2/3.
    assert M.rouge_l_recall("the cat sat", "the cat sat on the mat") == pytest.approx(0.5)
    assert M.rouge_l_f1("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    # The stemmer maps "cats"/"cat" and "sitting"/"sit" together; no overlap at all scores 0.
    assert M.rouge_l_recall("Cats", "cat") == pytest.approx(1.0)
    assert M.rouge_l_recall("dog", "cat sat") == 0.0


# ----------------------------------------------------------------- memorisation
@pytest.mark.parametrize(
    "flags, expected",
    [
        ([True, True, True], 1.0),  # k = 0
        ([False, True, True], 1 - 1 / 3),  # suffix from k = 1 exact
        ([True, False, True, True], 1 - 2 / 4),  # last wrong at 1 → k = 2
        ([False, False, False, True], 1 - 3 / 4),  # only the last token → k = 3
        ([True, True, False], 1 / 3),  # last token wrong: the reference's loop stops at k = |y|−1
        ([False], 1.0),  # |y| = 1: k can only be 0
        ([], 0.0),
    ],
)
def test_extraction_strength(flags, expected):
    assert M.extraction_strength(flags) == pytest.approx(expected)


def test_extraction_strength_matches_reference_loop():
    """A float64 transcription of the reference's loop over k, on every flag list of length ≤ 6."""

    def reference(flags):
        n = len(flags)
        k = 0
        for k in range(n):
            if all(flags[k:]):
                break
        return 1 - k / n

    for n in range(1, 7):
        for flags in itertools.product([False, True], repeat=n):
            assert M.extraction_strength(list(flags)) == pytest.approx(reference(flags))


def test_exact_memorization():
    assert M.exact_memorization([True, False, True, True]) == 0.75
    assert M.exact_memorization([]) is None


# ----------------------------------------------------------------- MIA scores
def test_loss_and_zlib_scores():
    assert M.loss_score(np.array([-1.0, -2.0, -3.0])) == pytest.approx(2.0)
    text = "the same words again and again and again"
    assert M.zlib_score(np.array([-1.0, -2.0, -3.0]), text) == pytest.approx(2.0 / len(zlib.compress(text.encode())))


def test_min_k_score():
    values = np.array([-1.0, -5.0, -3.0, -2.0, -4.0])
    # k = 0.4: ⌊5·0.4⌋ = 2 lowest are −5, −4 → −mean = 4.5. k = 0.1: max(1, 0) = 1 → 5. k = 1: mean → 3.
    assert M.min_k_score(values, 0.4) == pytest.approx(4.5)
    assert M.min_k_score(values, 0.1) == pytest.approx(5.0)
    assert M.min_k_score(values, 1.0) == pytest.approx(3.0)
    assert M.min_k_score(np.array([]), 0.4) == 0.0
    with pytest.raises(ValueError):
        M.min_k_score(values, 0.0)


def test_minkpp_z_scores_by_hand():
    # Position 0: a two-token vocabulary p = (0.8, 0.2), label = token 1.
    #   μ = 0.8 ln 0.8 + 0.2 ln 0.2, σ² = 0.8 ln²0.8 + 0.2 ln²0.2 − μ², z = (ln 0.2 − μ)/σ.
    # Position 1: uniform p = (0.5, 0.5): σ² = 0 → clamped to 1e-6; z = (ln 0.5 − ln 0.5)/1e-3 = 0.
    vocab = np.log(np.array([[0.8, 0.2], [0.5, 0.5]]))
    token = np.array([math.log(0.2), math.log(0.5)])
    mu = 0.8 * math.log(0.8) + 0.2 * math.log(0.2)
    sigma = math.sqrt(0.8 * math.log(0.8) ** 2 + 0.2 * math.log(0.2) ** 2 - mu**2)
    z = M.minkpp_z_scores(token, vocab)
    np.testing.assert_allclose(z, [(math.log(0.2) - mu) / sigma, 0.0], atol=1e-9)
    # Min-k%++ with k = 0.5 of two positions takes the lower one.
    assert M.min_k_plus_plus_score(z, 0.5) == pytest.approx(-min(z))


def test_auc_hand_cases():
    # Forget (lower = member) 1, 2, 3 vs holdout 2.5, 4: pairs with forget < holdout:
    # (1,2.5) (1,4) (2,2.5) (2,4) (3,4) = 5 of 6.
    assert M.auc([1.0, 2.0, 3.0], [2.5, 4.0]) == pytest.approx(5 / 6)
    # Ties count half: (1<2) (1<3) (2=2 → ½) (2<3) = 3.5 of 4.
    assert M.auc([1.0, 2.0], [2.0, 3.0]) == pytest.approx(3.5 / 4)
    # Forget scoring clearly lower (more likely) → 1; the other way round → 0.
    assert M.auc([0.1, 0.2], [0.5, 0.6]) == 1.0
    assert M.auc([0.5, 0.6], [0.1, 0.2]) == 0.0


def test_auc_matches_direct_pair_count():
    rng = np.random.default_rng(1)
    forget = rng.integers(0, 6, size=23).astype(float)  # many ties
    holdout = rng.integers(0, 6, size=17).astype(float)
    pairs = sum(1.0 if f < h else 0.5 if f == h else 0.0 for f in forget for h in holdout)
    assert M.auc(forget, holdout) == pytest.approx(pairs / (len(forget) * len(holdout)), rel=1e-12)


def test_privleak_muse_orientation():
    # AUC' = 1 − AUC: unlearned 0.9 → 0.1, retain 0.5 → 0.5: (0.1 − 0.5)/0.5·100 = −80.
    assert M.privleak(0.9, 0.5) == pytest.approx(-80.0)
    # Over-unlearned (forget data looks less familiar than unseen data): positive.
    assert M.privleak(0.3, 0.5) == pytest.approx(40.0)
    assert M.privleak(0.62, 0.62) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        M.privleak(1.5, 0.5)
