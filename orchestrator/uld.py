"""ULD's two models as one scorer: the assistant built from the target, the logit difference, save/load.

The assistant is the target's first K decoder layers (+ embeddings, final norm, lm_head), frozen, with
LoRA on every linear layer inside the decoder layers. What evaluation sees is the composite
``target − alpha·assistant`` on the target's relative-top tokens (arXiv 2406.08607, §3; the repo's
``ContrastLLM``); elsewhere the target's logits pass unchanged, and generation never picks them.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from orchestrator.evaluation.scorer import ModelScorer, Scorer

ULD_CONFIG_NAME = "uld.json"
# Logit of every filtered token, teacher-forced and in generation (the repo's generation value): far below any kept one.
FILTERED_LOGIT = -1e3


# ---------------------------------------------------------------- the assistant
def assistant_layer_count(target_layers: int, requested: int) -> int:
    """K: ``requested`` layers, or a quarter of the target's depth (at least 1) when requested is 0."""
    if target_layers < 1:
        raise ValueError(f"target must have at least one decoder layer, got {target_layers}")
    if requested < 0:
        raise ValueError(f"assistant_layers must be ≥ 0 (0 = a quarter of the target), got {requested}")
    if requested > target_layers:
        raise ValueError(f"assistant_layers={requested} exceeds the target's {target_layers} decoder layers")
    return requested if requested > 0 else max(1, target_layers // 4)


def copy_first_layers(target: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """A new model of the target's class with its first ``num_layers`` decoder layers, all weights copied.

    Copies, not shares: DeepSpeed partitions the assistant's parameters in place, which must not touch
    the target. Build it before any ZeRO-3 context is active (``from_config`` would partition it).
    """
    config = copy.deepcopy(target.config)
    if num_layers > config.num_hidden_layers:
        raise ValueError(f"cannot copy {num_layers} layers from a target with {config.num_hidden_layers}")
    config.num_hidden_layers = num_layers
    # Some configs (Qwen2, Gemma2, ...) list a type per layer; keep the first K.
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]
    device = next(target.parameters()).device
    with torch.device(device):
        truncated = type(target)._from_config(config, dtype=target.dtype)
    target_state = target.state_dict()
    missing = [key for key in truncated.state_dict() if key not in target_state]
    if missing:
        raise ValueError(f"target has no weights for assistant keys {missing[:3]} (class {type(target).__name__})")
    # load_state_dict copies into the new model's own storage.
    truncated.load_state_dict({key: target_state[key] for key in truncated.state_dict()})
    truncated.requires_grad_(False)
    return truncated


def decoder_linear_names(model: PreTrainedModel) -> list[str]:
    """Names (last component) of every nn.Linear inside the decoder layers: LoRA's target_modules."""
    layers = _decoder_layers(model)
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in layers.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    if not names:
        raise ValueError(f"{type(model).__name__}: no nn.Linear inside the decoder layers to put LoRA on")
    return sorted(names)


def _decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList):
        return decoder.layers
    # Other layouts (e.g. GPT-style ``transformer.h``): the ModuleList as long as the model is deep.
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == model.config.num_hidden_layers:
            return module
    raise ValueError(f"{type(model).__name__}: cannot find its list of decoder layers")


def build_assistant(
    target: PreTrainedModel,
    num_layers: int,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float,
) -> PeftModel:
    """ULD's assistant: a copy of the target's first K layers, frozen, with LoRA on the decoder layers'
    linears. LoRA's B starts at zero, so before training the assistant computes exactly the truncated target.
    """
    return lora_assistant(copy_first_layers(target, num_layers), lora_rank, lora_alpha, lora_dropout)


def lora_assistant(truncated: PreTrainedModel, lora_rank: int, lora_alpha: float, lora_dropout: float) -> PeftModel:
    """LoRA on the decoder layers' linears of ``truncated`` (frozen, wrapped in place): ULD's assistant from
    a model that already has just the assistant's layers (models.build_module loads only those)."""
    truncated.requires_grad_(False)
    lora = LoraConfig(
        r=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=decoder_linear_names(truncated),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(truncated, lora)


# ---------------------------------------------------------------- the logit difference
def relative_top_mask(target_logits: torch.Tensor, rate: float) -> torch.Tensor:
    """Tokens ULD adjusts [..., V] (bool): the target's top ⌈rate·V⌉ OR log-prob ≥ max + log(rate).

    One threshold min(k-th largest, max + log rate) covers both (ties at the k-th value are kept, as in
    the repo's filter).
    """
    if not 0 < rate <= 1:
        raise ValueError(f"filter rate must be in (0, 1], got {rate}")
    logprobs = torch.log_softmax(target_logits.float(), dim=-1)
    vocab = logprobs.shape[-1]
    # The small epsilon keeps 0.01·300 = 3.0000000000000004 from becoming 4.
    top_k = min(vocab, max(1, math.ceil(rate * vocab - 1e-9)))
    kth_largest = logprobs.topk(top_k, dim=-1).values[..., -1:]
    relative = logprobs.max(dim=-1, keepdim=True).values + math.log(rate)
    return logprobs >= torch.minimum(kth_largest, relative)


class LogitDifferenceScorer(Scorer):
    """Scores ``target − alpha·assistant`` on the target's relative-top tokens; every other token gets
    FILTERED_LOGIT, so it is never generated.

    One rule for teacher-forced scoring and generation: the model scored is the model served. (The ULD
    repository's teacher-forced forward leaves filtered tokens at the target's logit while its greedy
    decoding sets them to −1e3; scored that way, extraction strength and exact memorisation could count
    an argmax that generation never emits.)
    """

    def __init__(self, target: torch.nn.Module, assistant: torch.nn.Module, alpha: float, filter_rate: float) -> None:
        if alpha < 0:
            raise ValueError(f"alpha must be ≥ 0, got {alpha}")
        if not 0 < filter_rate <= 1:
            raise ValueError(f"filter rate must be in (0, 1], got {filter_rate}")
        self.target = ModelScorer(target)
        self.assistant = ModelScorer(assistant)
        self.alpha = alpha
        self.filter_rate = filter_rate

    def _difference(self, target_logits: torch.Tensor, assistant_logits: torch.Tensor) -> torch.Tensor:
        target_logits = target_logits.float()
        kept = relative_top_mask(target_logits, self.filter_rate)
        adjusted = target_logits - self.alpha * assistant_logits.float()
        return torch.where(kept, adjusted, torch.full_like(target_logits, FILTERED_LOGIT))

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._difference(self.target.logits(input_ids, attention_mask),
                                self.assistant.logits(input_ids, attention_mask))

    # Generation keeps one KV cache per model; the state is the pair of ModelScorer states.
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
        target_logits, target_state = self.target.start(input_ids, attention_mask)
        assistant_logits, assistant_state = self.assistant.start(input_ids, attention_mask)
        return self._difference(target_logits, assistant_logits), (target_state, assistant_state)

    def step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        target_state, assistant_state = state
        target_logits, target_state = self.target.step(tokens, target_state)
        assistant_logits, assistant_state = self.assistant.step(tokens, assistant_state)
        return self._difference(target_logits, assistant_logits), (target_state, assistant_state)


# ---------------------------------------------------------------- save / load as a unit
def save_uld(
    directory: str | Path,
    target_reference: str,
    assistant: PeftModel,
    alpha: float,
    filter_rate: float,
    num_layers: int,
) -> Path:
    """Write the assistant's LoRA adapter and ``uld.json`` (how to rebuild the composite) to ``directory``.

    Only the adapter is stored: the assistant's base is re-copied from the target on load.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    assistant.save_pretrained(directory)
    lora = assistant.peft_config["default"]
    settings = {
        "target_reference": target_reference,
        "alpha": alpha,
        "filter_rate": filter_rate,
        "num_layers": num_layers,
        "lora_rank": lora.r,
        "lora_alpha": lora.lora_alpha,
        "lora_dropout": lora.lora_dropout,
        "lora_target_modules": sorted(lora.target_modules),
    }
    (directory / ULD_CONFIG_NAME).write_text(json.dumps(settings, indent=2) + "\n")
    return directory


def _load_from_pretrained(reference: str) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(reference)


def load_uld(
    directory: str | Path,
    load_target: Callable[[str], PreTrainedModel] | None = None,
) -> LogitDifferenceScorer:
    """Rebuild the composite saved by ``save_uld``; both models frozen and in eval mode.

    ``load_target`` turns the stored reference into the target (default: ``from_pretrained``; pass your
    own to choose device, dtype or a local cache).
    """
    directory = Path(directory)
    config_path = directory / ULD_CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"{directory} holds no {ULD_CONFIG_NAME}: not a ULD checkpoint")
    settings = json.loads(config_path.read_text())
    target = (load_target or _load_from_pretrained)(settings["target_reference"])
    target.requires_grad_(False)
    truncated = copy_first_layers(target, settings["num_layers"])
    assistant = PeftModel.from_pretrained(truncated, directory)
    assistant.requires_grad_(False)
    return LogitDifferenceScorer(target.eval(), assistant.eval(), settings["alpha"], settings["filter_rate"])
