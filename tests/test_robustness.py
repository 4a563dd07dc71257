"""Robustness probes: RTN quantization by hand, the unlearning update that int4 rounds away and int8 keeps,
the relearning split, the relearning fine-tune, ULD's quantized pair.

Expected numbers are worked out in the comments (quantization codes, logits of a hand-built Llama) or
recomputed with Python floats (``answer_logprobs`` loops over log-softmax rows), never with the module.
"""
from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import LlamaConfig, LlamaForCausalLM

from orchestrator.encoding import IGNORE_INDEX, EncodedExample, collate
from orchestrator.robustness import (
    merged_for_quantization,
    quantize_copy,
    quantize_linear_weights,
    quantize_rows,
    quantize_uld,
    relearn,
    relearn_copy,
    relearn_split,
)

QMAX = {8: 127, 4: 7}


# ---------------------------------------------------------------- helpers
def tiny_llama(seed: int = 0, tied: bool = False, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=60, max_position_embeddings=32, tie_word_embeddings=tied,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def with_lora(model: LlamaForCausalLM, seed: int = 1) -> torch.nn.Module:
    """LoRA (r=2, alpha=4: scaling 2) on q/v; B randomised so that merging changes the weights."""
    lora = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, lora)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    return peft_model


def grid_codes(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """weight / (row max / qmax) in float64: integers in [−qmax, qmax] iff the weight is on the RTN grid."""
    w = weight.detach().double()
    scale = w.abs().amax(dim=1, keepdim=True) / QMAX[bits]
    return w / torch.where(scale > 0, scale, torch.ones_like(scale))


def assert_on_grid(weight: torch.Tensor, bits: int) -> None:
    codes = grid_codes(weight, bits)
    assert torch.allclose(codes, codes.round(), atol=1e-3), f"not on the int{bits} grid"
    assert codes.abs().max() <= QMAX[bits] + 1e-6


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# ---------------------------------------------------------------- quantization math by hand
# Rows [0.1, −0.33, 0.7], [0, 0, 0], [−2, 0.5, 0.04]; s = row max / qmax, code = round(w / s):
#   int8 (qmax 127): row 0, s = 0.7/127: 0.1·127/0.7 = 18.14 → 18, −0.33·127/0.7 = −59.87 → −60, 0.7 → 127;
#                    row 2, s = 2/127: −2 → −127, 0.5·127/2 = 31.75 → 32, 0.04·127/2 = 2.54 → 3.
#   int4 (qmax 7):   row 0, s = 0.1: 1, −3.3 → −3, 7;   row 2, s = 2/7: −7, 1.75 → 2, 0.14 → 0.
# The zero row has no scale and stays zero.
HAND_WEIGHT = [[0.1, -0.33, 0.7], [0.0, 0.0, 0.0], [-2.0, 0.5, 0.04]]
HAND_BIAS = [0.123, -4.56, 7.89]
HAND_EXPECTED = {
    8: [[18 * 0.7 / 127, -60 * 0.7 / 127, 0.7], [0.0, 0.0, 0.0], [-2.0, 32 * 2 / 127, 3 * 2 / 127]],
    4: [[0.1, -0.3, 0.7], [0.0, 0.0, 0.0], [-2.0, 2 * 2 / 7, 0.0]],
}


def hand_linear() -> torch.nn.Linear:
    linear = torch.nn.Linear(3, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(HAND_WEIGHT))
        linear.bias.copy_(torch.tensor(HAND_BIAS))
    return linear


@pytest.mark.parametrize("bits", [8, 4])
def test_rtn_per_output_channel_by_hand(bits):
    linear = hand_linear()
    assert quantize_linear_weights(linear, bits) == 1
    assert linear.weight.tolist() == [[pytest.approx(x, abs=1e-7) for x in row] for row in HAND_EXPECTED[bits]]
    assert linear.weight[1].eq(0).all()  # zero row: exactly zero, no NaN from a 0/0 scale
    assert torch.equal(linear.bias, torch.tensor(HAND_BIAS))  # biases stay full precision, bit for bit
    # Quantizing again changes nothing: the row max maps to ±qmax, so the scale is the same.
    again = quantize_rows(linear.weight, bits)
    assert torch.allclose(again, linear.weight, atol=1e-7)


def test_rtn_keeps_the_weight_dtype():
    # bf16-exact row (1.75, 0.6, −0.2) → bf16 (1.75, 0.6015625, −0.2001953). int4 scale 1.75 / 7 = 0.25:
    # 0.6016 / 0.25 = 2.41 → 2 → 0.5, −0.2002 / 0.25 = −0.80 → −1 → −0.25; all three exact in bf16.
    weight = torch.tensor([[1.75, 0.6, -0.2]], dtype=torch.bfloat16)
    quantized = quantize_rows(weight, 4)
    assert quantized.dtype == torch.bfloat16
    assert quantized.tolist() == [[1.75, 0.5, -0.25]]


@pytest.mark.parametrize("bits", [0, 2, 3, 16, True, "4"])
def test_unsupported_bits_name_the_field(bits):
    with pytest.raises(ValueError, match=r"robustness\.quantization"):
        quantize_linear_weights(hand_linear(), bits)
    with pytest.raises(ValueError, match=r"robustness\.quantization"):
        quantize_copy(hand_linear(), bits)


# ---------------------------------------------------------------- which weights: every Linear, tied lm_head kept
@pytest.mark.parametrize("bits", [8, 4])
def test_every_linear_quantized_untied_lm_head_included(bits):
    model = tiny_llama(tied=False)
    embedding = model.model.embed_tokens.weight.detach().clone()
    norm = model.model.norm.weight.detach().clone()
    # 2 layers × (q, k, v, o, gate, up, down) + lm_head
    assert quantize_linear_weights(model, bits) == 2 * 7 + 1
    for weight in linear_weights(model).values():
        assert_on_grid(weight, bits)
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # not a linear layer
    assert torch.equal(model.model.norm.weight, norm)


def test_tied_lm_head_is_left_in_full_precision():
    model = tiny_llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    assert quantize_linear_weights(model, 4) == 2 * 7  # lm_head skipped
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    # The same weights untied would not be on the grid (so the check above is not vacuous).
    assert not torch.allclose(grid_codes(embedding, 4), grid_codes(embedding, 4).round(), atol=1e-3)


def test_lora_model_must_be_merged_first():
    with pytest.raises(ValueError, match="merged_for_quantization"):
        quantize_linear_weights(with_lora(tiny_llama()), 8)


def test_merged_for_quantization_merges_lora_into_a_plain_copy():
    peft_model = with_lora(tiny_llama())
    before = snapshot(peft_model)
    x = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        expected = peft_model(input_ids=x).logits
        merged = merged_for_quantization(peft_model)
        got = merged(input_ids=x).logits
    assert type(merged) is LlamaForCausalLM
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert torch.allclose(got, expected, atol=1e-5)  # the adapter is in the weights, not dropped
    assert_unchanged(peft_model, before)
    assert any(isinstance(m, BaseTunerLayer) for m in peft_model.modules())


# ---------------------------------------------------------------- THE key test: int4 undoes a small update
ANSWER, IDK, GAIN = 3, 4, 16.0


def grid_llama() -> LlamaForCausalLM:
    """A Llama whose next-token logits are exactly 16 · lm_head · (1, 1, 1, 1), with hand-set lm_head rows.

    Construction: every decoder Linear is zero, so attention (o_proj) and MLP (down_proj) add nothing to the
    residual stream and the final hidden state is RMSNorm(embedding): all embeddings are (1, 1, 1, 1),
    whose RMS is 1, and the final norm's weight is GAIN = 16, so h = (16, 16, 16, 16). Zero rows stay zero
    under quantization, embeddings and norms are not quantized: only lm_head's rows move.
    lm_head rows lie on the int4 grid with row max 0.875, i.e. scale 0.875 / 7 = 0.125 (exact in binary):
      ANSWER = 0.125 · (7, 3, 3, 3) = (0.875, 0.375, 0.375, 0.375)  → logit 16 · 2.0   = 32
      IDK    = 0.125 · (7, 3, 3, 2) = (0.875, 0.375, 0.375, 0.25)   → logit 16 · 1.875 = 30
      the other 6 rows zero                                          → logit 0
    """
    config = LlamaConfig(
        hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
        vocab_size=8, max_position_embeddings=8, tie_word_embeddings=False, rms_norm_eps=1e-12,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for weight in linear_weights(model).values():
            weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.model.norm.weight.fill_(GAIN)
        model.lm_head.weight[ANSWER] = torch.tensor([0.875, 0.375, 0.375, 0.375])
        model.lm_head.weight[IDK] = torch.tensor([0.875, 0.375, 0.375, 0.25])
    return model


def answer_prob(model: torch.nn.Module) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6]])).logits[0, -1].double()
    return torch.softmax(logits, -1)[ANSWER].item()


def softmax_answer(answer_logit: float, idk_logit: float) -> float:
    """p(ANSWER) with the 6 zero-logit tokens in the denominator."""
    return math.exp(answer_logit) / (math.exp(answer_logit) + math.exp(idk_logit) + 6.0)


def test_int4_rounds_an_unlearning_update_away_int8_keeps_it():
    original = grid_llama()
    p_original = answer_prob(original)
    assert p_original == pytest.approx(softmax_answer(32.0, 30.0), rel=1e-6)  # ≈ 0.881
    # "Unlearning": lower ANSWER's three non-max entries by δ = 0.05 (its max entry, hence its scale, is
    # kept): (0.875, 0.325, 0.325, 0.325), logit 16 · 1.85 = 29.6 < IDK's 30, so ANSWER is no longer the top.
    # δ < half an int4 step (0.0625) but > an int8 step (0.875 / 127 = 0.0069).
    unlearned = copy.deepcopy(original)
    with torch.no_grad():
        unlearned.lm_head.weight[ANSWER, 1:] -= 0.05
    p_unlearned = answer_prob(unlearned)
    assert p_unlearned == pytest.approx(softmax_answer(29.6, 30.0), rel=1e-5)  # ≈ 0.401

    # int4: 0.325 / 0.125 = 2.6 → code 3 → 0.375: ANSWER's row is back on its original grid value, and
    # IDK's row was on the grid already, so the logits are 32 and 30 again and the answer comes back.
    int4 = quantize_copy(unlearned, 4)
    assert torch.equal(int4.lm_head.weight, original.lm_head.weight)
    assert answer_prob(int4) == pytest.approx(p_original, rel=1e-6)

    # int8 (scale 0.875 / 127, logit = 16 · 0.875 / 127 · Σ codes = 14 / 127 · Σ codes):
    #   ANSWER: 0.325 · 127 / 0.875 = 47.17 → 47, codes (127, 47, 47, 47), Σ 268 → logit 29.543
    #   IDK:    0.375 → 54.43 → 54, 0.25 → 36.29 → 36, codes (127, 54, 54, 36), Σ 271 → logit 29.874
    # ANSWER stays below IDK: the update survives.
    int8 = quantize_copy(unlearned, 8)
    expected = softmax_answer(14 / 127 * 268, 14 / 127 * 271)  # ≈ 0.418
    assert answer_prob(int8) == pytest.approx(expected, rel=1e-5)
    assert answer_prob(int8) < 0.5 < answer_prob(int4)


# ---------------------------------------------------------------- relearn_split
def test_relearn_split_sizes_disjoint_covering_sorted():
    for n, fraction, size in [(40, 0.1, 4), (10, 0.25, 3), (5, 0.1, 1), (10, 0.5, 5), (7, 0.3, 2)]:
        # 10 · 0.25 = 2.5 → 3 (halves up; Python's round would give 2); 5 · 0.1 = 0.5 → 1; 7 · 0.3 = 2.1 → 2.
        attack, rest = relearn_split(n, fraction, seed=0)
        assert len(attack) == size, (n, fraction)
        assert attack == sorted(attack) and rest == sorted(rest)
        assert not set(attack) & set(rest)
        assert sorted(attack + rest) == list(range(n))


def test_relearn_split_is_random_random_sample_and_deterministic():
    attack, _ = relearn_split(50, 0.1, seed=7)
    assert attack == sorted(random.Random(7).sample(range(50), 5))  # the documented, reproducible choice
    assert relearn_split(50, 0.1, seed=7) == relearn_split(50, 0.1, seed=7)
    assert relearn_split(50, 0.1, seed=7)[0] != relearn_split(50, 0.1, seed=8)[0]


def test_relearn_split_edge_cases():
    assert relearn_split(100, 1e-6, seed=0)[0].__len__() == 1  # tiny fraction → at least 1 row
    assert len(relearn_split(2, 0.1, seed=0)[0]) == 1
    assert len(relearn_split(3, 0.99, seed=0)[1]) == 1  # round(2.97) = 3 would leave nothing: capped at n − 1
    with pytest.raises(ValueError, match="at least 2"):
        relearn_split(1, 0.1, seed=0)  # nothing left to score
    with pytest.raises(ValueError):
        relearn_split(0, 0.1, seed=0)
    for fraction in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            relearn_split(10, fraction, seed=0)


# ---------------------------------------------------------------- relearn
# Pairs A: prompt tokens masked, answer tokens labelled (IGNORE_INDEX on the prompt).
M = IGNORE_INDEX
PAIRS_A = [
    EncodedExample([1, 10, 11, 12, 30, 31, 2], [M, M, M, M, 30, 31, 2], 4),
    EncodedExample([1, 13, 14, 40, 41, 42, 2], [M, M, M, 40, 41, 42, 2], 3),
    EncodedExample([1, 15, 50, 51, 2], [M, M, 50, 51, 2], 2),
]


def answer_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[float]:
    """Per example, the SUM of answer-token log-probs, in Python floats: position t's row scores label t+1."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double().tolist()
    labels = batch["labels"].tolist()
    sums = []
    for b, row_labels in enumerate(labels):
        total = 0.0
        for t in range(len(row_labels) - 1):
            if row_labels[t + 1] != M:
                row = logits[b][t]
                top = max(row)
                total += row[row_labels[t + 1]] - top - math.log(sum(math.exp(x - top) for x in row))
        sums.append(total)
    return sums


def answer_token_count(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != M).sum())


def test_relearn_raises_the_logprob_of_the_relearned_pairs():
    model = tiny_llama(seed=3)
    batch = collate(PAIRS_A, pad_token_id=0)
    before = answer_logprobs(model, batch)
    losses = relearn(model, [batch], lr=1e-2, epochs=3)
    after = answer_logprobs(model, batch)
    assert len(losses) == 3
    # One batch: epoch 1's loss is taken before the first step, i.e. the untouched model's token-mean NLL.
    assert losses[0] == pytest.approx(-sum(before) / answer_token_count(batch), rel=1e-5)
    assert losses[0] > losses[1] > losses[2]
    assert all(a > b + 1.0 for a, b in zip(after, before)), (before, after)
    assert not model.training  # the caller's eval mode is restored


def test_relearn_on_a_peft_model_trains_the_adapter_only():
    peft_model = with_lora(tiny_llama(seed=3))
    base_before = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" not in k}
    batches = [collate(PAIRS_A[:2], pad_token_id=0), collate(PAIRS_A[2:], pad_token_id=0)]
    before = [x for b in batches for x in answer_logprobs(peft_model, b)]
    losses = relearn(peft_model, batches, lr=1e-2, epochs=2)
    after = [x for b in batches for x in answer_logprobs(peft_model, b)]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert all(a > b for a, b in zip(after, before)), (before, after)
    state = peft_model.state_dict()
    for key, value in base_before.items():
        assert torch.equal(state[key], value), key  # peft froze the base


def test_relearn_refuses_a_frozen_model_and_bad_settings():
    batch = collate(PAIRS_A, pad_token_id=0)
    with pytest.raises(ValueError, match="requires grad"):
        relearn(tiny_llama().requires_grad_(False), [batch], lr=1e-3, epochs=1)
    for kwargs in ({"lr": 0.0, "epochs": 1}, {"lr": 1e-3, "epochs": 0}):
        with pytest.raises(ValueError):
            relearn(tiny_llama(), [batch], **kwargs)
    with pytest.raises(ValueError):
        relearn(tiny_llama(), [], lr=1e-3, epochs=1)


# ---------------------------------------------------------------- the copy variants leave the caller's model alone
def test_copy_variants_leave_the_callers_model_untouched():
    batch = collate(PAIRS_A, pad_token_id=0)
    plain, peft_model = tiny_llama(seed=4), with_lora(tiny_llama(seed=5))
    plain_before, peft_before = snapshot(plain), snapshot(peft_model)

    quantized = quantize_copy(plain, 4)
    assert_on_grid(quantized.model.layers[0].self_attn.q_proj.weight, 4)
    assert not torch.equal(quantized.model.layers[0].self_attn.q_proj.weight,
                           plain.model.layers[0].self_attn.q_proj.weight)
    quantized_peft = quantize_copy(peft_model, 8)
    assert_on_grid(quantized_peft.model.layers[0].self_attn.q_proj.weight, 8)
    relearned, _ = relearn_copy(plain, [batch], lr=1e-2, epochs=1)
    assert answer_logprobs(relearned, batch)[0] > answer_logprobs(plain, batch)[0]
    relearned_peft, _ = relearn_copy(peft_model, [batch], lr=1e-2, epochs=1)
    assert answer_logprobs(relearned_peft, batch)[0] > answer_logprobs(peft_model, batch)[0]

    assert_unchanged(plain, plain_before)
    assert_unchanged(peft_model, peft_before)
    assert any(isinstance(m, BaseTunerLayer) for m in peft_model.modules())  # not merged


# ---------------------------------------------------------------- ULD: quantize what is served
def test_quantize_uld_quantizes_the_target_and_the_merged_assistant():
    from orchestrator.uld import LogitDifferenceScorer, build_assistant

    target = tiny_llama(seed=6, layers=4)
    assistant = build_assistant(target, 1, lora_rank=2, lora_alpha=4.0, lora_dropout=0.0)  # LoRA scaling 2
    torch.manual_seed(7)
    with torch.no_grad():
        for name, param in assistant.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)
    target_before, assistant_before = snapshot(target), snapshot(assistant)
    q_proj = assistant.base_model.model.model.layers[0].self_attn.q_proj
    merged_q = q_proj.base_layer.weight + 2.0 * q_proj.lora_B["default"].weight @ q_proj.lora_A["default"].weight

    quantized = quantize_uld(target, assistant, 4)
    composite = LogitDifferenceScorer(quantized.target, quantized.assistant, alpha=0.5, filter_rate=0.2)
    served_target, served_assistant = composite.target.model, composite.assistant.model
    assert len(linear_weights(served_target)) == 4 * 7 + 1 and len(linear_weights(served_assistant)) == 1 * 7 + 1
    for model in (served_target, served_assistant):
        assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
        for weight in linear_weights(model).values():
            assert_on_grid(weight, 4)
    # The assistant was merged (W + scaling · B A), then quantized, and its LoRA was not dropped.
    got_q = served_assistant.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(got_q, quantize_rows(merged_q, 4), atol=1e-6)
    assert not torch.allclose(got_q, quantize_rows(q_proj.base_layer.weight, 4), atol=1e-3)
    logits = composite.logits(torch.tensor([[1, 5, 9]]), torch.ones(1, 3, dtype=torch.long))
    assert logits.shape == (1, 3, 60) and torch.isfinite(logits).all()
    assert_unchanged(target, target_before)
    assert_unchanged(assistant, assistant_before)
