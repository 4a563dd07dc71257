"""The baseline methods and FLAT: each objective against a float64 transcription of its formula, and one
optimizer step on a tiny Llama that must move the forget answer's probability the intended way.

Expected values are NOT computed with methods.base helpers: ``token_logprobs`` below recomputes every
answer-token log-probability with Python floats (math.exp / math.log over the logits rows), and each test
writes the method's formula from METHODS.md on top of those numbers.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from methods import MethodInputs, ModelOutput, build_method, get_method_class, method_names
from orchestrator.encoding import IGNORE_INDEX, EncodedExample, collate

OURS = ("ga", "graddiff", "kl", "npo", "simnpo", "idkdpo", "rmu", "flat")
TRAINER_KEYS = {"lr", "epochs", "weight_decay"}
SPACE_KINDS = {"grid", "choice", "uniform", "loguniform", "randint"}
M = IGNORE_INDEX


# ---------------------------------------------------------------- float64 transcriptions
def rows(t: torch.Tensor) -> list:
    return t.double().tolist()


def log_softmax_at(row: list[float], index: int) -> float:
    top = max(row)
    return row[index] - top - math.log(sum(math.exp(x - top) for x in row))


def token_logprobs(out: ModelOutput) -> list[list[float]]:
    """Per example, the log-prob of each answer token: position t's logits score label t+1."""
    logits, labels = rows(out.logits), out.labels.tolist()
    result = []
    for b in range(len(labels)):
        result.append([
            log_softmax_at(logits[b][t], labels[b][t + 1])
            for t in range(len(labels[b]) - 1) if labels[b][t + 1] != M
        ])
    return result


def nll64(out: ModelOutput) -> float:
    flat = [x for example in token_logprobs(out) for x in example]
    return -sum(flat) / len(flat)


def seq_logprob64(out: ModelOutput) -> list[float]:
    return [sum(example) for example in token_logprobs(out)]


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


# ---------------------------------------------------------------- hand-made outputs (vocab 4, seq 4)
LABELS_A = torch.tensor([[M, 2, 1, 3], [M, M, 0, M]])  # example 1 is padded at its last position
MASK_A = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
LABELS_B = torch.tensor([[M, M, 3, 3], [M, 1, 2, 0]])
MASK_B = torch.ones(2, 4, dtype=torch.long)


def logits_from(seed: int) -> torch.Tensor:
    return torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2.0


@pytest.fixture
def hand() -> dict[str, ModelOutput]:
    """Policy and reference outputs of three splits; every pair of logits differs."""
    return {
        "forget": ModelOutput(logits_from(1), LABELS_A, MASK_A),
        "retain": ModelOutput(logits_from(2), LABELS_B, MASK_B),
        "template": ModelOutput(logits_from(3), LABELS_B, MASK_B),
        "ref_forget": ModelOutput(logits_from(4), LABELS_A, MASK_A),
        "ref_retain": ModelOutput(logits_from(5), LABELS_B, MASK_B),
        "ref_template": ModelOutput(logits_from(6), LABELS_B, MASK_B),
    }


def inputs_of(hand: dict[str, ModelOutput]) -> MethodInputs:
    policy = {k: v for k, v in hand.items() if not k.startswith("ref_")}
    reference = {k[4:]: v for k, v in hand.items() if k.startswith("ref_")}
    return MethodInputs(policy=policy, reference=reference)


def approx(x: float):
    return pytest.approx(x, rel=2e-5, abs=1e-6)


# ---------------------------------------------------------------- objectives on hand-made tensors
def test_token_logprob_transcription_by_hand():
    # Anchor the transcription itself on numbers worked out by hand: logits (0, log 3) → p = (1/4, 3/4).
    out = ModelOutput(torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]]), torch.tensor([[M, 1]]), torch.ones(1, 2))
    assert token_logprobs(out) == [[pytest.approx(math.log(0.75))]]
    assert nll64(out) == pytest.approx(-math.log(0.75))


def test_ga(hand):
    got = build_method("ga").objectives(inputs_of(hand))
    assert set(got) == {"forget"}
    assert got["forget"].item() == approx(-nll64(hand["forget"]))


def test_graddiff(hand):
    got = build_method("graddiff", gamma=0.7, alpha=1.3).objectives(inputs_of(hand))
    assert got["forget"].item() == approx(-0.7 * nll64(hand["forget"]))
    assert got["retain"].item() == approx(1.3 * nll64(hand["retain"]))


def kl64(policy: ModelOutput, reference: ModelOutput, reduction: str = "batchmean") -> float:
    """KL(p_ref ‖ p_θ) per position, averaged over every batch·seq position (padding included: the
    reference's "batchmean") or over the non-padding positions only ("tokens")."""
    p_rows, r_rows, mask = rows(policy.logits), rows(reference.logits), policy.attention_mask.tolist()
    terms = []
    for b in range(len(mask)):
        for t in range(len(mask[b])):
            if mask[b][t] or reduction == "batchmean":
                vocab = range(len(p_rows[b][t]))
                log_r = [log_softmax_at(r_rows[b][t], v) for v in vocab]
                log_p = [log_softmax_at(p_rows[b][t], v) for v in vocab]
                terms.append(sum(math.exp(log_r[v]) * (log_r[v] - log_p[v]) for v in vocab))
    return mean(terms)


@pytest.mark.parametrize("reduction", ["batchmean", "tokens"])
def test_kl(hand, reduction):
    got = build_method("kl", alpha=0.5, kl_reduction=reduction).objectives(inputs_of(hand))
    assert got["forget"].item() == approx(-nll64(hand["forget"]))
    assert got["retain"].item() == approx(0.5 * kl64(hand["retain"], hand["ref_retain"], reduction))


def test_kl_reductions_by_hand():
    # One sequence of 2 positions over a 2-token vocabulary; the second is padding. Position 1: policy
    # (½, ½), reference (¾, ¼): KL = ¾·ln(¾/½) + ¼·ln(¼/½) = 0.3040988 − 0.1732868 = 0.1308120. Position 2:
    # both (½, ½): 0. batchmean (open-unlearning) = 0.1308120 / 2; tokens = 0.1308120 / 1.
    from methods.base import kl_to_reference

    policy = ModelOutput(torch.zeros(1, 2, 2), torch.full((1, 2), IGNORE_INDEX), torch.tensor([[1, 0]]))
    reference = ModelOutput(torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]]), policy.labels, policy.attention_mask)
    assert kl_to_reference(policy, reference).item() == pytest.approx(0.0654060, abs=1e-6)
    assert kl_to_reference(policy, reference, "tokens").item() == pytest.approx(0.1308120, abs=1e-6)
    assert build_method("kl").params.kl_reduction == "batchmean"  # the reference's, by default


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_npo(hand, beta):
    got = build_method("npo", beta=beta, alpha=2.0).objectives(inputs_of(hand))
    ratios = [a - b for a, b in zip(seq_logprob64(hand["forget"]), seq_logprob64(hand["ref_forget"]))]
    expected = -(2 / beta) * mean([log_sigmoid(-beta * r) for r in ratios])
    assert got["forget"].item() == approx(expected)
    assert got["retain"].item() == approx(2.0 * nll64(hand["retain"]))


def test_npo_at_the_reference_is_two_log2_over_beta(hand):
    # At θ = ref the log-ratio is 0 and −(2/β)·log σ(0) = (2/β)·log 2, whatever the data.
    same = dict(hand, ref_forget=hand["forget"])
    got = build_method("npo", beta=0.1).objectives(inputs_of(same))
    assert got["forget"].item() == approx(20 * math.log(2))


def test_simnpo(hand):
    beta, gamma, c, alpha = 2.5, 0.3, 0.2, 1.5
    method = build_method("simnpo", beta=beta, gamma=gamma, npo_coeff=c, alpha=alpha)
    got = method.objectives(inputs_of(hand))
    per_example = token_logprobs(hand["forget"])
    inner = [-(beta / len(lp)) * sum(lp) - gamma for lp in per_example]  # |y| = 3 and 1 answer tokens
    assert [len(lp) for lp in per_example] == [3, 1]
    expected = c * -(2 / beta) * mean([log_sigmoid(z) for z in inner])
    assert got["forget"].item() == approx(expected)
    assert got["retain"].item() == approx(alpha * nll64(hand["retain"]))
    assert not get_method_class("simnpo").reference_splits


def test_idkdpo(hand):
    beta, alpha = 0.5, 0.8
    got = build_method("idkdpo", beta=beta, alpha=alpha).objectives(inputs_of(hand))
    chosen = [a - b for a, b in zip(seq_logprob64(hand["template"]), seq_logprob64(hand["ref_template"]))]
    rejected = [a - b for a, b in zip(seq_logprob64(hand["forget"]), seq_logprob64(hand["ref_forget"]))]
    expected = -(2 / beta) * mean([log_sigmoid(beta * (c - r)) for c, r in zip(chosen, rejected)])
    assert got["forget"].item() == approx(expected)
    assert got["retain"].item() == approx(alpha * nll64(hand["retain"]))


def flat_terms64(divergence: str, p_e: float, p_f: float) -> float:
    """The METHODS.md table, written out."""
    if divergence == "kl":
        return -p_e + math.exp(p_f - 1)
    if divergence == "pearson":
        return -p_e + p_f + p_f ** 2 / 4
    if divergence == "js":
        return math.log(1 + math.exp(-p_e)) + math.log(1 + math.exp(p_f)) - 2 * math.log(2)
    return 0.5 * math.tanh(p_f) - 0.5 * math.tanh(p_e)


@pytest.mark.parametrize("divergence", ["kl", "js", "pearson", "tv"])
def test_flat_per_sample(hand, divergence):
    got = build_method("flat", divergence=divergence).objectives(inputs_of(hand))
    p_f = [mean([math.exp(x) for x in lp]) for lp in token_logprobs(hand["forget"])]
    p_e = [mean([math.exp(x) for x in lp]) for lp in token_logprobs(hand["template"])]
    expected = mean([flat_terms64(divergence, e, f) for e, f in zip(p_e, p_f)])
    assert (got["template"] + got["forget"]).item() == approx(expected)


@pytest.mark.parametrize("divergence", ["kl", "js", "pearson", "tv"])
def test_flat_batch_level(hand, divergence):
    got = build_method("flat", divergence=divergence, averaging="batch").objectives(inputs_of(hand))

    # Released code: answer-token probabilities summed, divided by every shifted position of the padded
    # batch (2 examples × 3 positions), prompt and padding counting as 0.
    def batch_p(out: ModelOutput) -> float:
        return sum(math.exp(x) for lp in token_logprobs(out) for x in lp) / (2 * 3)

    expected = flat_terms64(divergence, batch_p(hand["template"]), batch_p(hand["forget"]))
    assert (got["template"] + got["forget"]).item() == approx(expected)


def test_flat_per_sample_and_batch_level_differ(hand):
    per_sample = build_method("flat").objectives(inputs_of(hand))
    batch = build_method("flat", averaging="batch").objectives(inputs_of(hand))
    assert abs(per_sample["forget"].item() - batch["forget"].item()) > 1e-3


# RMU hidden states [batch 2, seq 3, hidden 4]; retain example 1 has one answer position only.
RMU_FORGET_LABELS = torch.tensor([[M, 5, 6], [M, M, 7]])
RMU_RETAIN_LABELS = torch.tensor([[M, 8, 9], [M, 4, M]])


def hidden_output(seed: int, labels: torch.Tensor) -> ModelOutput:
    hidden = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(seed))
    return ModelOutput(torch.zeros(2, 3, 10), labels, torch.ones(2, 3), hidden=hidden)


def masked_mse64(hidden: list, target, labels: list) -> float:
    """Mean over hidden units of the squared error, averaged over each example's answer positions, then over
    the batch; ``target(b, t)`` gives the target row."""
    per_example = []
    for b in range(len(labels)):
        positions = [t for t in range(len(labels[b])) if labels[b][t] != M]
        errors = [mean([(h - g) ** 2 for h, g in zip(hidden[b][t], target(b, t))]) for t in positions]
        per_example.append(mean(errors))
    return mean(per_example)


def test_rmu():
    method = build_method("rmu", layer=3, steering_coeff=6.5, alpha=3.0, seed=11)
    forget, retain, ref_retain = (hidden_output(1, RMU_FORGET_LABELS), hidden_output(2, RMU_RETAIN_LABELS),
                                  hidden_output(3, RMU_RETAIN_LABELS))
    got = method.objectives(MethodInputs({"forget": forget, "retain": retain}, {"retain": ref_retain}))

    # u: U[0,1) entries from a generator seeded 11, divided by their L2 norm.
    draws = torch.rand(4, generator=torch.Generator().manual_seed(11)).double().tolist()
    norm = math.sqrt(sum(x * x for x in draws))
    target = [6.5 * x / norm for x in draws]
    expected_forget = masked_mse64(rows(forget.hidden), lambda b, t: target, RMU_FORGET_LABELS.tolist())
    ref = rows(ref_retain.hidden)
    expected_retain = masked_mse64(rows(retain.hidden), lambda b, t: ref[b][t], RMU_RETAIN_LABELS.tolist())
    assert got["forget"].item() == approx(expected_forget)
    assert got["retain"].item() == approx(3.0 * expected_retain)


def test_rmu_direction_is_fixed_and_seeded():
    a, b = build_method("rmu", seed=3), build_method("rmu", seed=3)
    u = a.direction(16)
    assert torch.equal(u, a.direction(16)) and torch.equal(u, b.direction(16))
    assert u.norm().item() == pytest.approx(1.0) and bool((u >= 0).all())
    assert not torch.equal(u, build_method("rmu", seed=4).direction(16))
    with pytest.raises(ValueError, match="hidden size"):
        a.direction(8)


def test_rmu_layer_and_trainable_parameters():
    default = build_method("rmu")
    # Output of model.layers[7] is HF hidden_states[8] (index 0 holds the embeddings).
    assert default.hidden_layer == 8
    assert default.trainable("model.embed_tokens.weight")
    wmdp = build_method("rmu", param_pattern=r"layers\.(5|6|7)\.mlp\.down_proj")
    assert wmdp.trainable("model.layers.6.mlp.down_proj.weight")
    assert not wmdp.trainable("model.layers.6.mlp.up_proj.weight")
    assert not wmdp.trainable("model.layers.15.mlp.down_proj.weight")
    assert not wmdp.trainable("model.layers.4.mlp.down_proj.weight")


def test_rmu_without_hidden_states_is_an_error(hand):
    with pytest.raises(ValueError, match="hidden"):
        build_method("rmu").objectives(
            MethodInputs({"forget": hand["forget"], "retain": hand["retain"]}, {"retain": hand["ref_retain"]})
        )


# ---------------------------------------------------------------- registry and parameters
def test_methods_are_registered_under_their_file_names():
    assert set(OURS) <= set(method_names())
    for name in OURS:
        assert get_method_class(name).name == name


@pytest.mark.parametrize("name", OURS)
def test_unknown_hyperparameter_is_named(name):
    with pytest.raises(ValueError, match="'lambda_typo'"):
        build_method(name, lambda_typo=1.0)


@pytest.mark.parametrize("name", OURS)
def test_default_space_uses_known_keys_and_kinds(name):
    cls = get_method_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Params)}
    assert cls.default_space, f"{name} has no default search space"
    assert "lr" in cls.default_space
    for key, spec in cls.default_space.items():
        assert key in fields | TRAINER_KEYS, f"{name}: unknown key {key!r}"
        assert len(spec) == 1 and set(spec) <= SPACE_KINDS, f"{name}.{key}: {spec}"
        if key in fields:  # every value the space can propose must build
            values = next(iter(spec.values()))
            for value in values:
                build_method(name, **{key: value})
    assert all(f.default is not dataclasses.MISSING for f in dataclasses.fields(cls.Params))
    assert cls.Params.__dataclass_params__.frozen


def test_defaults_follow_methods_md():
    assert dataclasses.asdict(build_method("graddiff").params) == {"gamma": 1.0, "alpha": 1.0}
    assert dataclasses.asdict(build_method("npo").params) == {"beta": 0.1, "alpha": 1.0}
    assert dataclasses.asdict(build_method("simnpo").params) == {
        "beta": 4.5, "gamma": 0.0, "npo_coeff": 0.125, "alpha": 1.0}
    assert dataclasses.asdict(build_method("idkdpo").params) == {"beta": 0.1, "alpha": 1.0}
    rmu = build_method("rmu").params
    assert (rmu.layer, rmu.steering_coeff, rmu.alpha, rmu.param_pattern) == (7, 2.0, 1.0, ".*")
    assert dataclasses.asdict(build_method("flat").params) == {"divergence": "kl", "averaging": "sample"}


@pytest.mark.parametrize("name, bad", [
    ("npo", {"beta": 0.0}), ("simnpo", {"beta": -1.0}), ("idkdpo", {"alpha": -1.0}),
    ("graddiff", {"gamma": -1.0}), ("kl", {"alpha": -0.1}), ("rmu", {"layer": -1}),
    ("rmu", {"param_pattern": "layers.("}), ("flat", {"divergence": "hellinger"}), ("flat", {"averaging": "token"}),
])
def test_bad_hyperparameter_values_are_value_errors(name, bad):
    with pytest.raises(ValueError, match=name):
        build_method(name, **bad)


def test_splits_and_references():
    expected = {
        "ga": (("forget",), ()),
        "graddiff": (("forget", "retain"), ()),
        "kl": (("forget", "retain"), ("retain",)),
        "npo": (("forget", "retain"), ("forget",)),
        "simnpo": (("forget", "retain"), ()),
        "idkdpo": (("forget", "template", "retain"), ("forget", "template")),
        "rmu": (("forget", "retain"), ("retain",)),
        "flat": (("forget", "template"), ()),
    }
    for name, (splits, reference) in expected.items():
        cls = get_method_class(name)
        assert (cls.splits, cls.reference_splits) == (splits, reference), name


# ---------------------------------------------------------------- one optimizer step on a tiny Llama
# Token ids: 0 bos, 1 eos, 2 pad; prompts and answers use distinct ids so the splits do not overlap.
FORGET = [([0, 3, 4, 5], [10, 11, 12]), ([0, 6, 7], [13, 14, 15, 16])]
TEMPLATE = [([0, 3, 4, 5], [20, 21]), ([0, 6, 7], [20, 22, 23])]  # same questions, refusal-style answers
RETAIN = [([0, 8, 9], [30, 31, 32]), ([0, 40, 41, 42], [33, 34])]


def batch_of(pairs) -> dict[str, torch.Tensor]:
    examples = [
        EncodedExample(prompt + answer + [1], [M] * len(prompt) + answer + [1], len(prompt))
        for prompt, answer in pairs
    ]
    return collate(examples, pad_token_id=2)


BATCHES = {"forget": batch_of(FORGET), "template": batch_of(TEMPLATE), "retain": batch_of(RETAIN)}


def forward(model, batch, hidden_layer) -> ModelOutput:
    """As the worker does: hidden = hidden_states[hidden_layer]."""
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                output_hidden_states=hidden_layer is not None, use_cache=False)
    hidden = out.hidden_states[hidden_layer] if hidden_layer is not None else None
    return ModelOutput(out.logits, batch["labels"], batch["attention_mask"], hidden)


def answer_nll(model, split: str) -> float:
    """Mean answer-token NLL of a split: −log of TOFU's length-normalised probability."""
    with torch.no_grad():
        return nll64(forward(model, BATCHES[split], None))


@pytest.fixture(scope="module")
def memorised():
    """A tiny random-init Llama fine-tuned on forget + retain until it recalls them (the 'target')."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        loss = sum(model(**BATCHES[s]).loss for s in ("forget", "retain"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert answer_nll(model, "forget") < 0.3  # memorised: exp(−NLL) above ~0.75
    model.eval()
    return model


def one_step(target, name: str, lr: float = 1e-3, **params):
    """Build the method's inputs from forwards of a trainable copy and a frozen reference; one Adam step."""
    method = build_method(name, **params)
    model, reference = copy.deepcopy(target), copy.deepcopy(target).requires_grad_(False)
    trained = [p for n, p in model.named_parameters() if method.trainable(n)]
    layer = method.hidden_layer
    policy = {s: forward(model, BATCHES[s], layer) for s in method.splits}
    with torch.no_grad():
        ref = {s: forward(reference, BATCHES[s], layer) for s in method.reference_splits}
    total = sum(method.objectives(MethodInputs(policy, ref)).values())
    optimizer = torch.optim.Adam(trained, lr=lr)
    total.backward()
    optimizer.step()
    return model


@pytest.mark.parametrize("name, params", [
    ("ga", {}), ("graddiff", {}), ("kl", {}), ("npo", {}), ("simnpo", {}), ("idkdpo", {}), ("flat", {}),
    ("flat", {"divergence": "js", "averaging": "batch"}),
])
def test_one_step_lowers_forget_probability(memorised, name, params):
    before = answer_nll(memorised, "forget")
    after = answer_nll(one_step(memorised, name, **params), "forget")
    assert after > before + 1e-4, f"{name}: forget NLL {before:.5f} → {after:.5f}"


@pytest.mark.parametrize("name, params", [("idkdpo", {}), ("flat", {}), ("flat", {"divergence": "tv"})])
def test_one_step_raises_template_probability(memorised, name, params):
    # Any forgetting step frees probability mass, some of which lands on the template answer; a method that
    # targets the template must raise it clearly more than plain gradient ascent does.
    before = answer_nll(memorised, "template")
    after = answer_nll(one_step(memorised, name, **params), "template")
    after_ga = answer_nll(one_step(memorised, "ga"), "template")
    assert after < before - 1e-4, f"{name}: template NLL {before:.5f} → {after:.5f}"
    assert before - after > 2 * (before - after_ga), f"{name}: {before - after:.4f} vs GA {before - after_ga:.4f}"


def test_rmu_step_trains_only_the_chosen_parameters_and_lowers_forget_probability(memorised):
    # Steer the output of layer 0, training only that layer's down_proj (the WMDP recipe, scaled down).
    params = {"layer": 0, "param_pattern": r"layers\.0\.mlp\.down_proj", "steering_coeff": 2.0}
    model = one_step(memorised, "rmu", lr=1e-2, **params)
    changed = {n for (n, p), q in zip(model.named_parameters(), memorised.parameters()) if not torch.equal(p, q)}
    assert changed == {"model.layers.0.mlp.down_proj.weight"}
    assert answer_nll(model, "forget") > answer_nll(memorised, "forget") + 1e-4


def test_rmu_default_pattern_step_lowers_forget_probability(memorised):
    before = answer_nll(memorised, "forget")
    after = answer_nll(one_step(memorised, "rmu", layer=0), "forget")
    assert after > before + 1e-4
