"""Prompt templates: how a question is put to a model, shared by training and evaluation.

A target must be scored with the template it was fine-tuned with, so the templates live in one place.
Torch-free: the spec validates its ``model.prompt_template`` against them before anything heavy loads.
"""
from __future__ import annotations

# Named templates for the targets users fine-tune on; `{question}` is replaced, the answer follows.
PROMPT_TEMPLATES: dict[str, str] = {
    # The embedded benchmark's: it ends in a newline, which byte-level BPE always keeps as its own token,
    # so the prompt tokenises the same alone as in front of its answer. A prompt ending in a space does
    # not: " Florian" is one token in training, a lone " " at generation, and greedy decoding then starts
    # from a token the model never saw after "Answer:" (measured: ROUGE 0.03 at answer probability 0.8).
    "embedded": "Question: {question}\nAnswer:\n",
    "qa": "Question: {question}\nAnswer: ",
    "phi": "Question: {question}\nAnswer: ",  # TOFU's phi-1.5 format (same string as "qa")
    "llama2": "[INST] {question} [/INST]",
    "llama3": (
        "<|start_header_id|>user<|end_header_id|>\n\n{question}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    # open-unlearning's Llama-3.2 TOFU models were fine-tuned with the chat template's system turn.
    "llama3_tofu": (
        "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 10 Apr 2025\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{question}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    # SmolLM2-Instruct's ChatML turns (the answer ends in its EOS, <|im_end|>). Its chat template inserts a
    # default system turn when none is given; measured on SmolLM2-135M-Instruct (embedded benchmark, 35
    # authors × 5 questions, greedy, 48 new tokens), leaving it out costs 2 of 40 real-authors rows the base
    # model answers (18 vs 20; world facts 32 vs 32 of 40) and saves 21 of 56 tokens per training sequence
    # (35 vs 56 on average), so "smollm2" goes without; "smollm2_system" is the chat template's own rendering.
    "smollm2": "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
    "smollm2_system": (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    ),
}


def resolve_template(template: str) -> str:
    """A template name from PROMPT_TEMPLATES, or a literal format string containing ``{question}``."""
    if template in PROMPT_TEMPLATES:
        return PROMPT_TEMPLATES[template]
    if "{question}" not in template:
        raise ValueError(
            f"prompt template {template!r} is neither a known name ({', '.join(PROMPT_TEMPLATES)}) "
            "nor a format string containing {question}"
        )
    return template
