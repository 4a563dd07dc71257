"""ULD: the assistant built from the target, the relative-top filter, the composite scorer, the objectives.

Expected values are worked out by hand (filter) or recomputed directly from the two models' own logits
and from float64 loops over the definitions in METHODS.md (objectives).
"""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from methods.base import IGNORE_INDEX, MethodInputs, ModelOutput, build_method, get_method_class, param_names
from orchestrator.uld import (
    FILTERED_LOGIT,
    LogitDifferenceScorer,
    assistant_layer_count,
    build_assistant,
    load_uld,
    relative_top_mask,
    save_uld,
)

VOCAB = 64
LINEAR_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def tiny_target(seed: int = 0, logit_scale: float = 1.0) -> LlamaForCausalLM:
    """4-layer Llama; ``logit_scale`` sharpens its next-token distribution so the filter drops tokens."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model.eval()


def randomise_lora(assistant, seed: int = 1) -> None:
    """LoRA B starts at zero (assistant == truncated target); give it weights so the two differ."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in assistant.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)


def left_padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.tensor([[0, 0, 5, 9, 13], [7, 11, 3, 20, 31]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    return input_ids, attention_mask


# ---------------------------------------------------------------- the assistant
def test_layer_count_default_is_a_quarter_of_the_depth_at_least_one():
    assert assistant_layer_count(32, 0) == 8
    assert assistant_layer_count(4, 0) == 1
    assert assistant_layer_count(3, 0) == 1  # 3 // 4 = 0 → at least 1
    assert assistant_layer_count(8, 3) == 3
    assert assistant_layer_count(4, 4) == 4
    with pytest.raises(ValueError):
        assistant_layer_count(4, 5)
    with pytest.raises(ValueError):
        assistant_layer_count(4, -1)


def _target_name(assistant_name: str) -> str:
    # peft wraps the model (base_model.model.) and each adapted linear (.base_layer).
    return assistant_name.removeprefix("base_model.model.").replace(".base_layer", "")


def test_assistant_copies_the_first_k_layers_and_trains_only_lora():
    target = tiny_target()
    assistant = build_assistant(target, 2, lora_rank=4, lora_alpha=8, lora_dropout=0.0)
    assert assistant.config.num_hidden_layers == 2
    assert target.config.num_hidden_layers == 4  # the target's config was copied, not edited

    target_params = dict(target.named_parameters())
    copied = {name: param for name, param in assistant.named_parameters() if "lora_" not in name}
    # embeddings + 2 layers × 9 tensors (7 linears, 2 norms) + final norm + lm_head
    assert len(copied) == 1 + 2 * 9 + 1 + 1
    for name, param in copied.items():
        source = target_params[_target_name(name)]
        assert torch.equal(param, source), name
        assert param.data_ptr() != source.data_ptr(), f"{name} shares storage with the target"
        assert not param.requires_grad, name
    assert not any(name.startswith("model.layers.2") for name in map(_target_name, copied))

    trainable = [name for name, param in assistant.named_parameters() if param.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    adapted = {name.split(".")[-4] for name in trainable if name.endswith("lora_A.default.weight")}
    assert adapted == LINEAR_NAMES  # every linear of the decoder layers, lm_head not among them
    assert len([n for n in trainable if n.endswith("lora_A.default.weight")]) == 2 * len(LINEAR_NAMES)


def test_untrained_assistant_computes_the_truncated_target():
    # LoRA B = 0 at start: the assistant is the target's first K layers followed by its norm and lm_head.
    target = tiny_target()
    assistant = build_assistant(target, 2, lora_rank=4, lora_alpha=8, lora_dropout=0.0).eval()
    input_ids, attention_mask = left_padded_prompts()
    with torch.no_grad():
        hidden = target.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        # hidden_states[2] is the output of layer 2 before the final norm (the last entry is normed).
        expected = target.lm_head(target.model.norm(hidden.hidden_states[2]))
        got = assistant(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------- the relative-top filter
def test_relative_top_mask_keeps_the_documented_tokens():
    # s ≥ max(s) + log r  ⇔  logit ≥ max(logit) + log r (log-softmax shifts all logits by one constant).
    logits = torch.tensor(
        [
            # r = 0.2, V = 10: top ⌈2⌉ = {0, 6}; max + log 0.2 = 5 − 1.609 = 3.391 → {0 (5.0), 1 (4.0),
            # 2 (3.5), 6 (4.9)}; 3 (3.3) just misses. Union: {0, 1, 2, 6}.
            [5.0, 4.0, 3.5, 3.3, 0.0, -1.0, 4.9, 2.0, 3.0, -5.0],
            # Same r: top 2 = {3 (9.0), 5 (1.0)}; 9 − 1.609 = 7.391 → {3} only. Union: {3, 5} (top-k wins).
            [0.0, -2.0, 0.5, 9.0, -1.0, 1.0, 0.2, -3.0, 0.9, 0.1],
        ]
    )
    kept = relative_top_mask(logits, 0.2)
    assert kept[0].nonzero().flatten().tolist() == [0, 1, 2, 6]
    assert kept[1].nonzero().flatten().tolist() == [3, 5]
    # r = 0.15: ⌈1.5⌉ = 2 tokens; 9 + log 0.15 = 7.10 adds none → still {3, 5}.
    assert relative_top_mask(logits[1], 0.15).nonzero().flatten().tolist() == [3, 5]
    # r = 0.1: ⌈1⌉ = 1 token; 9 − 2.303 = 6.70 → {3}.
    assert relative_top_mask(logits[1], 0.1).nonzero().flatten().tolist() == [3]
    with pytest.raises(ValueError):
        relative_top_mask(logits, 0.0)


# ---------------------------------------------------------------- the composite scorer
def test_composite_logits_subtract_the_assistant_on_kept_tokens_and_filter_the_rest():
    target = tiny_target(logit_scale=60.0)
    assistant = build_assistant(target, 1, lora_rank=4, lora_alpha=8, lora_dropout=0.0).eval()
    randomise_lora(assistant)
    input_ids = torch.tensor([[1, 5, 9, 13, 17, 21], [1, 7, 11, 3, 2, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    alpha, rate = 0.75, 0.05
    scorer = LogitDifferenceScorer(target, assistant, alpha, rate)
    with torch.no_grad():
        target_logits = target(input_ids=input_ids, attention_mask=attention_mask).logits
        assistant_logits = assistant(input_ids=input_ids, attention_mask=attention_mask).logits
        composite = scorer.logits(input_ids, attention_mask)
    kept = relative_top_mask(target_logits, rate)
    assert kept.any() and (~kept).any()  # both branches are exercised
    assert not torch.allclose(assistant_logits[kept], torch.zeros_like(assistant_logits[kept]))
    torch.testing.assert_close(composite[kept], target_logits[kept] - alpha * assistant_logits[kept])
    # Filtered tokens get the same logit as in generation (one rule): teacher-forced argmax == generated token.
    assert (composite[~kept] == FILTERED_LOGIT).all()
    assert (composite.argmax(-1)[..., None] == composite.topk(1, dim=-1).indices).all()
    assert kept.gather(-1, composite.argmax(-1, keepdim=True)).all()


class ShiftedLogits(torch.nn.Module):
    """Test double: a causal LM whose logits are raised by a fixed vector (the rest passes through)."""

    def __init__(self, model: torch.nn.Module, shift: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("shift", shift)

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.logits = out.logits + self.shift
        return out


def test_generation_never_emits_a_filtered_token():
    # The assistant scores every token +300 higher, so target − α·assistant on kept tokens falls ~300
    # below the target's logits of the filtered ones: only the −1e3 on filtered tokens keeps the argmax
    # inside the kept set, teacher-forced (what ES/EM read) as in greedy decoding.
    target = tiny_target(logit_scale=60.0)
    assistant = ShiftedLogits(build_assistant(target, 1, 4, 8, 0.0).eval(), torch.full((VOCAB,), 300.0))
    rate = 0.05
    scorer = LogitDifferenceScorer(target, assistant, alpha=1.0, filter_rate=rate)
    input_ids, attention_mask = left_padded_prompts()
    with torch.no_grad():
        first = scorer.logits(input_ids, attention_mask)[:, -1]
        target_last = target(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1]
    kept_first = relative_top_mask(target_last, rate)
    assert kept_first.gather(1, first.argmax(-1, keepdim=True)).all()  # teacher-forced argmax is a kept token

    generated = scorer.generate(input_ids, attention_mask, max_new_tokens=6, eos_token_id=2, pad_token_id=0)
    for row in range(input_ids.shape[0]):
        prefix_ids, prefix_mask = input_ids[row : row + 1], attention_mask[row : row + 1]
        for token in generated[row].tolist():
            position_ids = (prefix_mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = target(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=position_ids).logits
            assert relative_top_mask(logits[0, -1], rate)[token], f"row {row} generated filtered token {token}"
            if token == 2:
                break
            prefix_ids = torch.cat([prefix_ids, torch.tensor([[token]])], dim=1)
            prefix_mask = torch.cat([prefix_mask, torch.ones((1, 1), dtype=prefix_mask.dtype)], dim=1)


def greedy_without_cache(target, assistant, alpha, rate, input_ids, attention_mask, steps, eos, pad):
    """Reference decoder: recompute both models over the whole sequence at every step."""
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    generated = []
    for _ in range(steps):
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            t = target(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, -1]
            a = assistant(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, -1]
        composite = torch.where(relative_top_mask(t, rate), t - alpha * a, torch.full_like(t, FILTERED_LOGIT))
        tokens = torch.where(finished, torch.full_like(finished, pad, dtype=torch.long), composite.argmax(-1))
        generated.append(tokens)
        finished |= tokens == eos
        if finished.all():
            break
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(tokens)[:, None]], dim=1)
    return torch.stack(generated, dim=1)


def test_cached_generation_equals_recomputing_the_whole_sequence():
    # float64 so that cache/no-cache rounding cannot flip an argmax.
    target = tiny_target(logit_scale=20.0).double()
    assistant = build_assistant(target, 2, lora_rank=4, lora_alpha=8, lora_dropout=0.0).eval()
    randomise_lora(assistant)
    alpha, rate = 0.8, 0.1
    input_ids, attention_mask = left_padded_prompts()
    scorer = LogitDifferenceScorer(target, assistant, alpha, rate)
    cached = scorer.generate(input_ids, attention_mask, max_new_tokens=8, eos_token_id=2, pad_token_id=0)
    expected = greedy_without_cache(target, assistant, alpha, rate, input_ids, attention_mask, 8, eos=2, pad=0)
    assert cached.shape[1] > 1
    assert torch.equal(cached, expected)
    # The assistant changes what is generated (otherwise the comparison would not test the difference).
    plain = greedy_without_cache(target, assistant, 0.0, rate, input_ids, attention_mask, 8, eos=2, pad=0)
    assert not torch.equal(plain, expected)


# ---------------------------------------------------------------- save / load
def test_save_then_load_gives_identical_logits(tmp_path):
    target = tiny_target(logit_scale=30.0)
    target_dir = tmp_path / "target"
    target.save_pretrained(target_dir)
    assistant = build_assistant(target, 2, lora_rank=4, lora_alpha=8, lora_dropout=0.0).eval()
    randomise_lora(assistant)
    scorer = LogitDifferenceScorer(target, assistant, 0.8, 0.05)
    save_uld(tmp_path / "uld", str(target_dir), assistant, alpha=0.8, filter_rate=0.05, num_layers=2)

    loaded = load_uld(tmp_path / "uld")  # default loader: from_pretrained on the stored local path
    assert (loaded.alpha, loaded.filter_rate) == (0.8, 0.05)
    input_ids, attention_mask = left_padded_prompts()
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(input_ids, attention_mask), scorer.logits(input_ids, attention_mask))
    assert not any(param.requires_grad for param in loaded.assistant.model.parameters())

    with pytest.raises(ValueError):
        load_uld(tmp_path)  # no uld.json there


def test_load_uses_the_given_target_loader(tmp_path):
    target = tiny_target()
    assistant = build_assistant(target, 1, 4, 8, 0.0)
    save_uld(tmp_path, "some/hub-id", assistant, alpha=0.75, filter_rate=0.01, num_layers=1)
    seen = []
    loaded = load_uld(tmp_path, load_target=lambda reference: seen.append(reference) or target)
    assert seen == ["some/hub-id"]
    assert loaded.target.model is target


# ---------------------------------------------------------------- the method
def _output(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> ModelOutput:
    return ModelOutput(logits=logits, labels=labels, attention_mask=attention_mask)


def test_objectives_match_a_float64_transcription():
    torch.manual_seed(3)
    vocab = 7
    forget_logits = torch.randn(2, 5, vocab)
    forget_labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 1], [IGNORE_INDEX, 2, 6, IGNORE_INDEX, IGNORE_INDEX]])
    forget_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    retain_logits = torch.randn(2, 4, vocab)
    retain_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    retain_labels = torch.full((2, 4), IGNORE_INDEX)  # the uniform term ignores labels
    method = build_method("uld", retain_weight=6.5)
    got = method.objectives(
        MethodInputs(
            policy={
                "forget_augmented": _output(forget_logits, forget_labels, forget_mask),
                "retain_augmented": _output(retain_logits, retain_labels, retain_mask),
            }
        )
    )

    def log_softmax(row):
        values = [float(v) for v in row]
        top = max(values)
        normaliser = top + math.log(sum(math.exp(v - top) for v in values))
        return [v - normaliser for v in values]

    # forget: mean over answer tokens of −log p(label_{t+1} | logits_t).
    losses = []
    for b in range(2):
        for t in range(4):
            label = int(forget_labels[b, t + 1])
            if label != IGNORE_INDEX:
                losses.append(-log_softmax(forget_logits[b, t].double())[label])
    expected_forget = sum(losses) / len(losses)
    # retain: w · mean over non-padding positions of −(1/V) Σ_v log p_v.
    terms = [
        -sum(log_softmax(retain_logits[b, t].double())) / vocab
        for b in range(2)
        for t in range(4)
        if retain_mask[b, t]
    ]
    expected_retain = 6.5 * sum(terms) / len(terms)
    assert got.keys() == {"forget", "retain"}
    assert got["forget"].item() == pytest.approx(expected_forget, rel=1e-5)
    assert got["retain"].item() == pytest.approx(expected_retain, rel=1e-5)


def test_method_declaration_and_defaults():
    cls = get_method_class("uld")
    assert cls.trains == "assistant"
    assert cls.splits == ("forget_augmented", "retain_augmented")
    assert cls.reference_splits == ()
    params = build_method("uld").params
    assert (params.alpha, params.filter_rate, params.assistant_layers, params.retain_weight) == (0.75, 0.01, 0, 6.5)
    assert (params.lora_rank, params.lora_alpha, params.lora_dropout) == (32, 32.0, 0.05)
    assert set(cls.default_space) <= set(param_names("uld")) | {"lr", "epochs", "weight_decay"}
    with pytest.raises(ValueError):
        build_method("uld", filter_rate=0.0)
    with pytest.raises(ValueError):
        build_method("uld", assistant_layers=-1)
