"""Loading models and tokenizers: a small Llama built from a config for the embedded benchmark, or any
``from_pretrained`` directory or id (model_sources.py says which references exist). Loading never
downloads when offline: a missing id is one line."""
from __future__ import annotations

import os

import torch

from orchestrator.errors import ModelLoadError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 matrices natively: a CUDA GPU that supports it, or a CPU with
    AVX-512 BF16 / AMX (oneDNN's bf16 path). Elsewhere torch falls back to a reference GEMM: measured 18×
    slower than float32 for SmolLM2-135M (forward + backward, batch 8 × 48, one thread, AVX2 EPYC: 100 s
    vs 5.5 s a step)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def training_autocast(requested: str | None, device: torch.device) -> torch.dtype | None:
    """training.autocast on this device: the requested dtype where its matmuls are native, else None (the
    forwards run in model.dtype), said once in the worker's log."""
    if requested is None:
        return None
    if not native_bf16(device):
        print(f"training.autocast: {requested} ignored on this {device.type} (no native bf16 matmul, torch "
              f"CPU capability {torch.backends.cpu.get_cpu_capability()}): training forwards run in model.dtype",
              flush=True)
        return None
    return DTYPES[requested]


def build_embedded_model(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                         intermediate_size: int, max_positions: int, seed: int):
    """A small LlamaForCausalLM from a config (random init, seeded): the embedded benchmark's model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_positions, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_model(reference: str, dtype: str = "float32", trust_remote_code: bool = False, num_layers: int | None = None):
    """``num_layers``: only the first this-many decoder layers (ULD's assistant), the rest never loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.path.expanduser(reference)
    try:
        extra = {}
        if num_layers is not None:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            if num_layers > config.num_hidden_layers:
                raise ValueError(f"cannot take {num_layers} layers of {reference} ({config.num_hidden_layers} layers)")
            config.num_hidden_layers = num_layers
            if isinstance(getattr(config, "layer_types", None), list):  # Qwen2, Gemma2, ...: a type per layer
                config.layer_types = config.layer_types[:num_layers]
            extra["config"] = config
        return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                    **extra)
    except OSError as err:
        raise ModelLoadError(f"cannot load model {reference!r}: {str(err).splitlines()[0][:160]}") from None


def load_tokenizer(reference: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(reference), trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelLoadError(f"cannot load tokenizer {reference!r}: {str(err).splitlines()[0][:160]}") from None
    if tokenizer.pad_token_id is None:  # the reference pads with EOS
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def apply_lora(model, rank: int, alpha: float, dropout: float, target_modules: list[str] | None):
    """Wrap ``model`` with peft LoRA on every linear layer but lm_head (or the named modules)."""
    from peft import LoraConfig, get_peft_model

    if target_modules is None:
        target_modules = sorted({
            name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
        })
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none")
    return get_peft_model(model, config)


def build_module(model_cfg: dict, lora: dict | None, method):
    """What a trial trains, freshly built: the model (LoRA-wrapped when ``lora``) or ULD's assistant (the
    target's first layers, loaded alone). Inside ``zero.partitioned_loading`` the weights load partitioned."""
    path, dtype, remote = model_cfg["path"], model_cfg["dtype"], model_cfg["trust_remote_code"]
    if method.trains == "assistant":
        from transformers import AutoConfig

        from orchestrator.uld import assistant_layer_count, lora_assistant

        p = method.params
        layers = assistant_layer_count(AutoConfig.from_pretrained(path, trust_remote_code=remote).num_hidden_layers,
                                       p.assistant_layers)
        return lora_assistant(load_model(path, dtype, remote, num_layers=layers), p.lora_rank, p.lora_alpha,
                              p.lora_dropout)
    base = load_model(path, dtype, remote)
    if lora:
        return apply_lora(base, lora["rank"], lora["alpha"], lora["dropout"], lora["target_modules"])
    return base
