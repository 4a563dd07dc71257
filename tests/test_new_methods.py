"""Open-unlearning's newer methods (UNDIAL, AltPO, SatImp, WGA, CE-U, PDU): each objective against METHODS.md's
worked numbers and a float64 transcription of its formula, the gradients of the detached-weight losses
against hand-derived ones, PDU's dual variable (also on two gloo processes), and one SGD step on a tiny
Llama that must lower the forget answer's probability.

Expected values are NOT computed with methods.base helpers: the transcriptions below redo every softmax
with Python floats (math.exp / math.log over the logits rows) and write each formula out on top of them.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math

import pytest
import torch
import torch.multiprocessing as mp

from methods import MethodInputs, ModelOutput, build_method, get_method_class, method_names
from methods.base import SPLITS, UnlearningMethod
from orchestrator.encoding import IGNORE_INDEX, EncodedExample, collate

NEW = ("undial", "altpo", "satimp", "wga", "ceu", "pdu")
TRAINER_KEYS = {"lr", "epochs", "weight_decay"}
SPACE_KINDS = {"grid", "choice", "uniform", "loguniform", "randint"}
M = IGNORE_INDEX


def approx(x: float):
    return pytest.approx(x, rel=2e-5, abs=1e-6)


# ---------------------------------------------------------------- float64 transcriptions
def rows(t: torch.Tensor) -> list:
    return t.double().tolist()


def softmax64(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    return [e / sum(exps) for e in exps]


def log_softmax64(row: list[float]) -> list[float]:
    top = max(row)
    log_total = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - log_total for x in row]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def answer_steps(out: ModelOutput) -> list[tuple[int, int, int]]:
    """(example, position, label) for every position whose NEXT label is an answer token."""
    labels = out.labels.tolist()
    return [(b, t, labels[b][t + 1]) for b in range(len(labels)) for t in range(len(labels[b]) - 1)
            if labels[b][t + 1] != M]


def token_logprobs64(out: ModelOutput) -> list[list[float]]:
    """Per example, the log-prob of each answer token."""
    logits = rows(out.logits)
    per_example: list[list[float]] = [[] for _ in range(out.labels.shape[0])]
    for b, t, y in answer_steps(out):
        per_example[b].append(log_softmax64(logits[b][t])[y])
    return per_example


def nll64(out: ModelOutput) -> float:
    flat = [x for example in token_logprobs64(out) for x in example]
    return -sum(flat) / len(flat)


def cross_entropy64(target: list[float], logits_row: list[float]) -> float:
    """−Σ_v q_v log p_v."""
    return -sum(q * lp for q, lp in zip(target, log_softmax64(logits_row)))


def undial64(policy: ModelOutput, reference: ModelOutput, beta: float, all_positions: bool = False) -> float:
    """Mean of CE(p_θ,t, softmax(z_ref,t − β·onehot(y_{t+1}))) over answer positions, or over every position
    whose own and next token are real (then prompt positions distil the reference unchanged)."""
    pol, ref = rows(policy.logits), rows(reference.logits)
    labels, att = policy.labels.tolist(), policy.attention_mask.tolist()
    terms = []
    for b in range(len(labels)):
        for t in range(len(labels[b]) - 1):
            y = labels[b][t + 1]
            if not (att[b][t] and att[b][t + 1]) if all_positions else y == M:
                continue
            z = list(ref[b][t])
            if y != M:
                z[y] -= beta
            terms.append(cross_entropy64(softmax64(z), pol[b][t]))
    return mean(terms)


def ceu_targets64(out: ModelOutput, n: int) -> list[tuple[int, int, list[float]]]:
    """(example, position, q) with q_v = p_v/(1 − p_y), q_y = 0, skipping each example's first n answer tokens."""
    logits, seen, result = rows(out.logits), {}, []
    for b, t, y in answer_steps(out):
        seen[b] = seen.get(b, 0) + 1
        if seen[b] <= n:
            continue
        p = softmax64(logits[b][t])
        result.append((b, t, [0.0 if v == y else p[v] / (1 - p[y]) for v in range(len(p))]))
    return result


def ceu64(out: ModelOutput, n: int) -> float:
    logits = rows(out.logits)
    return mean([cross_entropy64(q, logits[b][t]) for b, t, q in ceu_targets64(out, n)])


def pdu_forget64(out: ModelOutput) -> float:
    logits = rows(out.logits)
    return mean([(max(logits[b][t]) - mean(logits[b][t])) ** 2 for b, t, _ in answer_steps(out)])


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


# ---------------------------------------------------------------- hand-made outputs (vocab 4, seq 5)
# Example 0: four answer tokens; example 1: a prompt position, two answer tokens, then padding.
LABELS_A = torch.tensor([[M, 2, 1, 3, 0], [M, M, 0, 1, M]])
MASK_A = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
LABELS_B = torch.tensor([[M, M, 3, 3, 1], [M, 1, 2, 0, 2]])
MASK_B = torch.ones(2, 5, dtype=torch.long)


def logits_from(seed: int) -> torch.Tensor:
    return torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(seed)) * 2.0


@pytest.fixture
def hand() -> dict[str, ModelOutput]:
    """Policy and reference outputs of three splits; every pair of logits differs."""
    return {
        "forget": ModelOutput(logits_from(1), LABELS_A, MASK_A),
        "retain": ModelOutput(logits_from(2), LABELS_B, MASK_B),
        "alternate": ModelOutput(logits_from(3), LABELS_B, MASK_B),
        "ref_forget": ModelOutput(logits_from(4), LABELS_A, MASK_A),
        "ref_alternate": ModelOutput(logits_from(6), LABELS_B, MASK_B),
    }


def inputs_of(hand: dict[str, ModelOutput]) -> MethodInputs:
    policy = {k: v for k, v in hand.items() if not k.startswith("ref_")}
    reference = {k[4:]: v for k, v in hand.items() if k.startswith("ref_")}
    return MethodInputs(policy=policy, reference=reference)


def one_position(logits: list[float], label: int) -> ModelOutput:
    """A one-token answer: position 0's logits score the label at position 1."""
    return ModelOutput(torch.tensor([[logits, [0.0] * len(logits)]]), torch.tensor([[M, label]]), torch.ones(1, 2))


def with_logprob(logprob: float) -> ModelOutput:
    """A one-token answer of the given log-prob: logits (a, 0) with a = log(e^(−logprob) − 1) give token 1
    probability 1/(1 + e^a) = e^logprob."""
    return one_position([math.log(math.exp(-logprob) - 1.0), 0.0], 1)


def with_probs(probs: list[float]) -> ModelOutput:
    """Answer tokens of the given probabilities: vocab 2, logits (log p, log(1 − p)), label 0."""
    logits = [[math.log(p), math.log(1 - p)] for p in probs] + [[0.0, 0.0]]
    return ModelOutput(torch.tensor([logits]), torch.tensor([[M] + [0] * len(probs)]), torch.ones(1, len(probs) + 1))


Z200 = one_position([2.0, 0.0, 0.0], 0)  # METHODS.md's logits [2, 0, 0] scoring label 0
RETAIN_HALF = with_logprob(-0.5)  # a retain batch of NLL 0.5


# ---------------------------------------------------------------- UNDIAL
@pytest.mark.parametrize("beta, worked", [(10.0, 2.2392), (3.0, 1.9288)])
def test_undial_worked_number(beta, worked):
    # z_ref = z_θ = [2, 0, 0], y = 0: q = softmax([2 − β, 0, 0]), loss = −Σ q log softmax([2, 0, 0]).
    z = [2.0, 0.0, 0.0]
    q0 = math.exp(2 - beta) / (math.exp(2 - beta) + 2)
    log_total = math.log(math.exp(2) + 2)
    expected = -(q0 * (2 - log_total) + (1 - q0) * (0 - log_total))
    assert expected == pytest.approx(worked, abs=5e-5)
    out = one_position(z, 0)
    retain = with_logprob(-0.5)
    got = build_method("undial", beta=beta).objectives(MethodInputs({"forget": out, "retain": retain}, {"forget": out}))
    assert got["forget"].item() == approx(expected)
    assert got["retain"].item() == 0.0  # α = 0 by default


def test_undial(hand):
    got = build_method("undial", beta=3.0, gamma=0.5, alpha=2.0).objectives(inputs_of(hand))
    assert got["forget"].item() == approx(0.5 * undial64(hand["forget"], hand["ref_forget"], 3.0))
    assert got["retain"].item() == approx(2.0 * nll64(hand["retain"]))


def test_undial_all_positions(hand):
    # Example 1 adds its prompt position t = 0 (target: the reference's softmax, no penalty); its padded
    # position t = 3 stays out.
    got = build_method("undial", beta=3.0, all_positions=True).objectives(inputs_of(hand))
    expected = undial64(hand["forget"], hand["ref_forget"], 3.0, all_positions=True)
    assert got["forget"].item() == approx(expected)
    assert abs(expected - undial64(hand["forget"], hand["ref_forget"], 3.0)) > 1e-3


def test_undial_gradient_is_p_minus_q_and_the_reference_gets_none(hand):
    # ∂/∂z_θ of the mean over N answer positions of −Σ q log softmax(z_θ) is (p − q)/N, q a constant.
    policy_logits = hand["forget"].logits.clone().requires_grad_(True)
    ref_logits = hand["ref_forget"].logits.clone().requires_grad_(True)
    policy = ModelOutput(policy_logits, LABELS_A, MASK_A)
    reference = ModelOutput(ref_logits, LABELS_A, MASK_A)
    beta = 3.0
    build_method("undial", beta=beta).objectives(
        MethodInputs({"forget": policy, "retain": hand["retain"]}, {"forget": reference}))["forget"].backward()
    assert ref_logits.grad is None  # the target is detached
    pol, ref, steps = rows(policy_logits.detach()), rows(ref_logits.detach()), answer_steps(policy)
    expected = torch.zeros(2, 5, 4, dtype=torch.float64)
    for b, t, y in steps:
        z = list(ref[b][t])
        z[y] -= beta
        q, p = softmax64(z), softmax64(pol[b][t])
        expected[b, t] = torch.tensor([(p[v] - q[v]) / len(steps) for v in range(4)])
    torch.testing.assert_close(policy_logits.grad.double(), expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- AltPO
def altpo_inputs(alt: float, alt_ref: float, true: float, true_ref: float) -> MethodInputs:
    retain = with_logprob(-0.5)
    return MethodInputs({"alternate": with_logprob(alt), "forget": with_logprob(true), "retain": retain},
                        {"alternate": with_logprob(alt_ref), "forget": with_logprob(true_ref)})


def test_altpo_worked_numbers():
    # log π(ỹ) = −10 (ref −12), log π(y) = −5 (ref −4): β·[(−10 + 12) − (−5 + 4)] = 0.1·3 = 0.3,
    # −(2/0.1)·log σ(0.3) = 20·log(1 + e^(−0.3)) = 11.087.
    expected = -(2 / 0.1) * log_sigmoid(0.1 * ((-10 + 12) - (-5 + 4)))
    assert expected == pytest.approx(11.087, abs=5e-4)
    got = build_method("altpo").objectives(altpo_inputs(-10.0, -12.0, -5.0, -4.0))
    assert got["forget"].item() == pytest.approx(expected, rel=1e-4)
    # At π = ref the margin is 0: −20·log σ(0) = 20·ln 2 = 13.863.
    at_reference = build_method("altpo").objectives(altpo_inputs(-10.0, -10.0, -5.0, -5.0))
    assert at_reference["forget"].item() == pytest.approx(20 * math.log(2), rel=1e-5)
    assert 20 * math.log(2) == pytest.approx(13.863, abs=5e-4)
    assert got["retain"].item() == pytest.approx(0.5, rel=1e-5)  # α = 1 times NLL 0.5


def test_altpo(hand):
    beta, alpha = 0.5, 0.8
    got = build_method("altpo", beta=beta, alpha=alpha).objectives(inputs_of(hand))

    def seq(split: str) -> list[float]:
        return [sum(lp) for lp in token_logprobs64(hand[split])]

    chosen = [a - b for a, b in zip(seq("alternate"), seq("ref_alternate"))]
    rejected = [a - b for a, b in zip(seq("forget"), seq("ref_forget"))]
    expected = -(2 / beta) * mean([log_sigmoid(beta * (c - r)) for c, r in zip(chosen, rejected)])
    assert got["forget"].item() == approx(expected)
    assert got["retain"].item() == approx(alpha * nll64(hand["retain"]))


# ---------------------------------------------------------------- SatImp and WGA
def test_satimp_worked_number():
    # p = [0.5, 0.25], β1 = 5, β2 = 1: −mean(p^5·(1 − p)·(−log p))
    #   = −(0.015625·0.693147 + 0.000732422·1.386294)/2 = −0.005923.
    expected = -mean([p ** 5 * (1 - p) * -math.log(p) for p in (0.5, 0.25)])
    assert expected == pytest.approx(-0.005923, abs=5e-7)
    got = build_method("satimp").objectives(MethodInputs({"forget": with_probs([0.5, 0.25]), "retain": RETAIN_HALF}))
    assert got["forget"].item() == approx(expected)
    assert got["retain"].item() == pytest.approx(0.1 * 0.5, rel=1e-5)  # α = 0.1 by default


def test_wga_worked_number():
    # p = [0.5, 0.25], β = 1: mean(p·log p) = (0.5·(−0.693147) + 0.25·(−1.386294))/2 = −0.34657.
    expected = mean([p * math.log(p) for p in (0.5, 0.25)])
    assert expected == pytest.approx(-0.34657, abs=5e-6)
    got = build_method("wga").objectives(MethodInputs({"forget": with_probs([0.5, 0.25]), "retain": RETAIN_HALF}))
    assert got["forget"].item() == approx(expected)
    assert got["retain"].item() == pytest.approx(0.5, rel=1e-5)


def satimp_weight(p: float, beta1: float, beta2: float) -> float:
    return p ** beta1 * (1 - p) ** beta2


@pytest.mark.parametrize("name, params, weight", [
    ("satimp", {"beta1": 2.0, "beta2": 0.5, "gamma": 0.7, "alpha": 0.3}, lambda p: 0.7 * satimp_weight(p, 2.0, 0.5)),
    ("wga", {"beta": 0.5, "gamma": 0.7, "alpha": 0.3}, lambda p: 0.7 * p ** 0.5),
])
def test_weighted_ascent_is_a_batch_token_mean(hand, name, params, weight):
    # SatImp's −tokmean(w·(−log p)) and WGA's tokmean(w·log p) are both tokmean(w·log p), over the 6 answer
    # tokens of the batch at once (example 0 has 4, example 1 has 2), not a mean of the two per-example means.
    got = build_method(name, **params).objectives(inputs_of(hand))
    flat = [lp for example in token_logprobs64(hand["forget"]) for lp in example]
    assert len(flat) == 6
    expected = mean([weight(math.exp(lp)) * lp for lp in flat])
    per_example = mean([mean([weight(math.exp(lp)) * lp for lp in ex]) for ex in token_logprobs64(hand["forget"])])
    assert got["forget"].item() == approx(expected)
    assert abs(expected - per_example) > 1e-3
    assert got["retain"].item() == approx(0.3 * nll64(hand["retain"]))


@pytest.mark.parametrize("name, params, weight", [
    ("satimp", {}, lambda p: satimp_weight(p, 5.0, 1.0)),
    ("satimp", {"beta1": 1.0, "beta2": 2.0}, lambda p: satimp_weight(p, 1.0, 2.0)),
    ("wga", {}, lambda p: p),
    ("wga", {"beta": 3.0}, lambda p: p ** 3),
])
def test_weighted_ascent_gradient_treats_the_weight_as_constant(hand, name, params, weight):
    # Both losses are (1/N)·Σ_t w_t·log p_t with w_t constant, so ∂/∂z_t,v = (1/N)·w_t·(1[v = y_t] − p_t,v);
    # a weight left attached adds w'_t·log p_t terms and fails this.
    logits = hand["forget"].logits.clone().requires_grad_(True)
    out = ModelOutput(logits, LABELS_A, MASK_A)
    objectives = build_method(name, **params).objectives(MethodInputs({"forget": out, "retain": hand["retain"]}))
    objectives["forget"].backward()
    values, steps = rows(logits.detach()), answer_steps(out)
    expected = torch.zeros(2, 5, 4, dtype=torch.float64)
    for b, t, y in steps:
        p = softmax64(values[b][t])
        expected[b, t] = torch.tensor([weight(p[y]) * ((v == y) - p[v]) / len(steps) for v in range(4)])
    torch.testing.assert_close(logits.grad.double(), expected, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- CE-U
def test_ceu_worked_number():
    # z = [2, 0, 0], y = 0: q = [0, ½, ½], loss = −½·2·log(1/(e² + 2)) = log(e² + 2) = 2.2395.
    expected = math.log(math.exp(2) + 2)
    assert expected == pytest.approx(2.2395, abs=5e-5)
    got = build_method("ceu", ignore_first_n_answer_tokens=0).objectives(MethodInputs({"forget": Z200}))
    assert got["forget"].item() == approx(expected)
    # With the default n = 1 the only answer token is left out: nothing to average, loss 0.
    default = build_method("ceu").objectives(MethodInputs({"forget": Z200}))
    assert default["forget"].item() == 0.0


@pytest.mark.parametrize("n", [0, 1, 2])
def test_ceu(hand, n):
    # Answer positions: example 0 has 4, example 1 has 2; n = 2 leaves 2 + 0 of them.
    got = build_method("ceu", ignore_first_n_answer_tokens=n).objectives(inputs_of(hand))
    assert len(ceu_targets64(hand["forget"], n)) == {0: 6, 1: 4, 2: 2}[n]
    assert got["forget"].item() == approx(ceu64(hand["forget"], n))


def test_ceu_gradient_is_p_minus_q(hand):
    # q is detached: ∂/∂z_t = (p_t − q_t)/N at the kept positions, 0 elsewhere.
    logits = hand["forget"].logits.clone().requires_grad_(True)
    out = ModelOutput(logits, LABELS_A, MASK_A)
    build_method("ceu").objectives(MethodInputs({"forget": out}))["forget"].backward()
    values, targets = rows(logits.detach()), ceu_targets64(out, 1)
    expected = torch.zeros(2, 5, 4, dtype=torch.float64)
    for b, t, q in targets:
        p = softmax64(values[b][t])
        expected[b, t] = torch.tensor([(p[v] - q[v]) / len(targets) for v in range(4)])
    torch.testing.assert_close(logits.grad.double(), expected, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- PDU
def test_pdu_worked_numbers():
    # logits [2, 0, 0]: (max − mean)² = (2 − 2/3)² = 16/9 = 1.778.
    assert (2 - 2 / 3) ** 2 == pytest.approx(1.778, abs=5e-4)
    method = build_method("pdu")
    got = method.objectives(MethodInputs({"forget": Z200, "retain": RETAIN_HALF}))
    assert got["forget"].item() == approx(16 / 9)
    assert got["retain"].item() == pytest.approx(100 * (0.5 - 0.3), rel=1e-5)  # λ0·(NLL_r − ε)
    # λ 100, η 5, ε 0.3, NLL_r 0.5: 100 + 5·(0.5 − 0.3) = 101 (epoch 6 is past the 5 warm-up epochs).
    method.after_step(6, lambda t: t)
    assert method.dual == pytest.approx(101.0, rel=1e-6)
    assert isinstance(method.dual, float)
    assert method.extras() == {"dual.lambda": pytest.approx(101.0, rel=1e-6)}


def test_pdu(hand):
    params = {"gamma": 0.4, "dual_init": 3.0, "retain_loss_eps": 0.2}
    got = build_method("pdu", **params).objectives(inputs_of(hand))
    assert got["forget"].item() == approx(0.4 * pdu_forget64(hand["forget"]))
    assert got["retain"].item() == approx(3.0 * (nll64(hand["retain"]) - 0.2))


def pdu_step(method, retain_nll: float, epoch: int) -> dict[str, torch.Tensor]:
    objectives = method.objectives(MethodInputs({"forget": Z200, "retain": with_logprob(-retain_nll)}))
    method.after_step(epoch, lambda t: t)
    return objectives


def test_pdu_dual_rises_falls_clamps_and_waits_for_warmup():
    method = build_method("pdu", dual_init=1.0, dual_step_size=2.0, retain_loss_eps=0.3, dual_warmup_epochs=2)
    for epoch in (1, 2):  # warm-up: λ stays at λ0 whatever the constraint says
        pdu_step(method, 0.9, epoch)
        assert method.dual == 1.0
    pdu_step(method, 0.9, 3)  # violated by 0.6: 1 + 2·0.6 = 2.2
    assert method.dual == pytest.approx(2.2, rel=1e-5)
    objectives = pdu_step(method, 0.1, 3)  # the objective used λ = 2.2; slack 0.2: 2.2 − 0.4 = 1.8
    assert objectives["retain"].item() == pytest.approx(2.2 * (0.1 - 0.3), rel=1e-5)
    assert method.dual == pytest.approx(1.8, rel=1e-5)
    pdu_step(method, 0.1 / 10, 4)  # 1.8 + 2·(0.01 − 0.3) = 1.22
    assert method.dual == pytest.approx(1.22, rel=1e-5)
    for _ in range(3):  # 1.22 − 0.58·k goes negative: clamped at 0
        pdu_step(method, 0.01, 4)
    assert method.dual == 0.0
    pdu_step(method, 0.8, 5)  # and climbs back when the constraint is violated again
    assert method.dual == pytest.approx(1.0, rel=1e-5)


def test_pdu_steps_once_per_objectives_call_and_not_without_one():
    method = build_method("pdu", dual_warmup_epochs=0)
    method.after_step(1, lambda t: pytest.fail("no objectives yet: nothing to average"))
    assert method.dual == 100.0
    pdu_step(method, 0.5, 1)
    method.after_step(1, lambda t: pytest.fail("the NLL was already used"))
    assert method.dual == pytest.approx(101.0, rel=1e-6)


def test_pdu_keeps_the_dual_on_a_non_finite_retain_nll():
    method = build_method("pdu", dual_warmup_epochs=0)
    method.objectives(MethodInputs({"forget": Z200, "retain": RETAIN_HALF}))
    method.after_step(1, lambda t: t * float("nan"))
    assert method.dual == 100.0


def test_pdu_state_round_trips_and_fixed_dual_without_step_size():
    method = build_method("pdu", dual_warmup_epochs=0)
    pdu_step(method, 0.5, 1)
    restored = build_method("pdu", dual_warmup_epochs=0)
    restored.load_state(method.state())
    assert restored.dual == method.dual == pytest.approx(101.0, rel=1e-6)
    with pytest.raises(ValueError, match="pdu"):
        restored.load_state({})
    fixed = build_method("pdu", dual_step_size=0.0, dual_warmup_epochs=0)
    pdu_step(fixed, 5.0, 1)
    assert fixed.dual == 100.0


def pdu_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One gloo process: a retain batch of NLL 0.5 (rank 0) or 0.9 (rank 1), one PDU dual step."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))

    def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
        total = value.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / world

    method = build_method("pdu", dual_warmup_epochs=0)
    method.objectives(MethodInputs({"forget": Z200, "retain": with_logprob(-(0.5 + 0.4 * rank))}))
    method.after_step(1, mean_over_ranks)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(method.state(), f)
    dist.destroy_process_group()


def test_pdu_dual_is_identical_on_two_ranks(tmp_path):
    # Mean NLL (0.5 + 0.9)/2 = 0.7: λ = 100 + 5·(0.7 − 0.3) = 102 on both ranks (alone they would hold 101 and 103).
    mp.spawn(pdu_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    duals = [json.loads((tmp_path / f"rank{r}.json").read_text())["dual"] for r in range(2)]
    assert duals[0] == duals[1]
    assert duals[0] == pytest.approx(102.0, rel=1e-6)


# ---------------------------------------------------------------- protocol defaults, registry, parameters
def test_stateless_methods_keep_the_protocol_defaults():
    for name in ("ga", "undial", "wga"):
        method = build_method(name)
        method.after_step(3, lambda t: pytest.fail("a stateless method must not join a collective"))
        assert method.state() == {} and method.extras() == {}
        method.load_state({})
    assert "after_step" not in vars(get_method_class("ga")) and UnlearningMethod.state is get_method_class("ga").state


def test_new_methods_are_registered_under_their_file_names():
    assert set(NEW) <= set(method_names())
    for name in NEW:
        assert get_method_class(name).name == name
    assert "alternate" in SPLITS


@pytest.mark.parametrize("name", NEW)
def test_default_space_uses_known_keys_and_kinds(name):
    cls = get_method_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Params)}
    assert cls.default_space and "lr" in cls.default_space
    for key, spec in cls.default_space.items():
        assert key in fields | TRAINER_KEYS, f"{name}: unknown key {key!r}"
        assert len(spec) == 1 and set(spec) <= SPACE_KINDS, f"{name}.{key}: {spec}"
        if key in fields:  # every value the space can propose must build
            for value in next(iter(spec.values())):
                build_method(name, **{key: value})
    assert all(f.default is not dataclasses.MISSING for f in dataclasses.fields(cls.Params))
    assert cls.Params.__dataclass_params__.frozen


@pytest.mark.parametrize("name", NEW)
def test_unknown_hyperparameter_is_named(name):
    with pytest.raises(ValueError, match="'lambda_typo'"):
        build_method(name, lambda_typo=1.0)


def test_defaults_follow_methods_md():
    defaults = {name: dataclasses.asdict(build_method(name).params) for name in NEW}
    assert defaults == {
        "undial": {"beta": 10.0, "gamma": 1.0, "alpha": 0.0, "all_positions": False},
        "altpo": {"beta": 0.1, "alpha": 1.0},
        "satimp": {"beta1": 5.0, "beta2": 1.0, "gamma": 1.0, "alpha": 0.1},
        "wga": {"beta": 1.0, "gamma": 1.0, "alpha": 1.0},
        "ceu": {"ignore_first_n_answer_tokens": 1},
        "pdu": {"gamma": 1.0, "dual_init": 100.0, "dual_step_size": 5.0, "retain_loss_eps": 0.3,
                "dual_warmup_epochs": 5},
    }


@pytest.mark.parametrize("name, bad", [
    ("undial", {"beta": 0.0}), ("undial", {"alpha": -1.0}), ("undial", {"gamma": -0.5}),
    ("altpo", {"beta": 0.0}), ("altpo", {"alpha": -1.0}),
    ("satimp", {"beta1": -1.0}), ("satimp", {"beta2": -1.0}), ("satimp", {"alpha": -0.1}),
    ("wga", {"beta": -1.0}), ("wga", {"gamma": -1.0}),
    ("ceu", {"ignore_first_n_answer_tokens": -1}), ("ceu", {"ignore_first_n_answer_tokens": 1.5}),
    ("pdu", {"dual_init": -1.0}), ("pdu", {"dual_step_size": -1.0}), ("pdu", {"retain_loss_eps": float("nan")}),
    ("pdu", {"dual_warmup_epochs": -1}), ("pdu", {"dual_warmup_epochs": 2.5}), ("pdu", {"gamma": -1.0}),
])
def test_bad_hyperparameter_values_are_value_errors(name, bad):
    with pytest.raises(ValueError, match=rf"^{name}: .*{next(iter(bad))}"):
        build_method(name, **bad)


def test_splits_and_references():
    expected = {
        "undial": (("forget", "retain"), ("forget",)),
        "altpo": (("forget", "alternate", "retain"), ("forget", "alternate")),
        "satimp": (("forget", "retain"), ()),
        "wga": (("forget", "retain"), ()),
        "ceu": (("forget",), ()),
        "pdu": (("forget", "retain"), ()),
    }
    for name, (splits, reference) in expected.items():
        cls = get_method_class(name)
        assert (cls.splits, cls.reference_splits) == (splits, reference), name


# ---------------------------------------------------------------- one SGD step on a tiny Llama
# Token ids: 0 bos, 1 eos, 2 pad; prompts and answers use distinct ids so the splits do not overlap.
FORGET = [([0, 3, 4, 5], [10, 11, 12]), ([0, 6, 7], [13, 14, 15, 16])]
ALTERNATE = [([0, 3, 4, 5], [24, 25, 26]), ([0, 6, 7], [27, 28, 29])]  # same questions, made-up answers
RETAIN = [([0, 8, 9], [30, 31, 32]), ([0, 40, 41, 42], [33, 34])]


def batch_of(pairs) -> dict[str, torch.Tensor]:
    examples = [
        EncodedExample(prompt + answer + [1], [M] * len(prompt) + answer + [1], len(prompt))
        for prompt, answer in pairs
    ]
    return collate(examples, pad_token_id=2)


BATCHES = {"forget": batch_of(FORGET), "alternate": batch_of(ALTERNATE), "retain": batch_of(RETAIN)}


def forward(model, batch) -> ModelOutput:
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return ModelOutput(out.logits, batch["labels"], batch["attention_mask"])


def answer_nll(model, split: str) -> float:
    """Mean answer-token NLL of a split: −log of TOFU's length-normalised probability."""
    with torch.no_grad():
        return nll64(forward(model, BATCHES[split]))


@pytest.fixture(scope="module")
def memorised():
    """A tiny seeded Llama (hidden 16, 2 layers, vocab 50) fine-tuned on forget + retain until it recalls
    them: SatImp's weight p^5·(1 − p) is ~1e-9 at a random model's p ≈ 1/50, so the target must know the answers.
    Training stops at forget NLL 0.3 (p ≈ 0.75), near that weight's peak at p = 5/6, not at saturation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = sum(model(**BATCHES[s]).loss for s in ("forget", "retain"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if answer_nll(model, "forget") < 0.3:  # memorised: exp(−NLL) above ~0.75
            break
    assert answer_nll(model, "forget") < 0.3
    model.eval()
    return model


def one_sgd_step(target, name: str, lr: float, **params):
    """Forwards of a trainable copy and of a frozen deepcopy as the reference; one SGD step on the sum of the
    method's objectives."""
    method = build_method(name, **params)
    model, reference = copy.deepcopy(target), copy.deepcopy(target).requires_grad_(False)
    policy = {s: forward(model, BATCHES[s]) for s in method.splits}
    with torch.no_grad():
        ref = {s: forward(reference, BATCHES[s]) for s in method.reference_splits}
    total = sum(method.objectives(MethodInputs(policy, ref)).values())
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    total.backward()
    optimizer.step()
    return model


# lr per method: a small step, so the first-order direction decides (the losses' scales differ by ~100×).
STEPS = [("undial", {}, 0.05), ("altpo", {}, 0.01), ("satimp", {}, 1.0), ("wga", {}, 0.1), ("ceu", {}, 0.05),
         ("pdu", {}, 1e-3), ("undial", {"all_positions": True, "alpha": 1.0}, 0.05)]


@pytest.mark.parametrize("name, params, lr", STEPS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(STEPS)])
def test_one_step_lowers_forget_probability(memorised, name, params, lr):
    before = answer_nll(memorised, "forget")
    after = answer_nll(one_sgd_step(memorised, name, lr, **params), "forget")
    assert after > before + 1e-4, f"{name}: forget NLL {before:.5f} → {after:.5f}"


def test_altpo_step_raises_the_alternate_answer(memorised):
    before = answer_nll(memorised, "alternate")
    after = answer_nll(one_sgd_step(memorised, "altpo", 0.01), "alternate")
    assert after < before - 1e-4, f"alternate NLL {before:.5f} → {after:.5f}"
