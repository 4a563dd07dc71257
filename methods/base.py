"""The method protocol and its registry.

A method declares what it needs (which batches, a frozen reference, hidden states, an assistant) and turns
tensors the worker computed into named objectives. The worker decides how objectives become an update:
a sum and one backward (``combine = "sum"``) or a min-norm common descent direction (``combine = "mgda"``).
Shared terms (answer log-probabilities, NLL, KL to the reference) are functions here, not base classes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# Batches a method can ask for. Each item of an epoch yields one example of every requested split:
#   forget            forget question + its answer
#   retain            a retain pair (cycled over the retain set)
#   template          forget question + a template ("I don't know"-style) answer, re-drawn at each load
#   forget_augmented  forget pairs plus their paraphrases (ULD's D'_f)
#   retain_augmented  retain pairs plus forget questions with wrong answers (ULD's D'_r)
SPLITS = ("forget", "retain", "template", "forget_augmented", "retain_augmented")


@dataclass
class ModelOutput:
    """What one forward pass over one split's batch gives a method."""

    logits: torch.Tensor  # [batch, seq, vocab]
    labels: torch.Tensor  # [batch, seq], IGNORE_INDEX on prompt and padding
    attention_mask: torch.Tensor  # [batch, seq]
    hidden: torch.Tensor | None = None  # [batch, seq, hidden] at the method's hidden_layer


@dataclass
class MethodInputs:
    """Outputs of the trained module (with grad) and of the frozen reference (no grad), by split."""

    policy: dict[str, ModelOutput]
    reference: dict[str, ModelOutput] = dataclasses.field(default_factory=dict)


class UnlearningMethod:
    """Base of every method. Subclasses set the class attributes and implement ``objectives``."""

    name: ClassVar[str] = ""
    # Hyperparameters: a frozen dataclass whose field names follow the paper.
    Params: ClassVar[type] = object
    # Batches consumed per step; the first one defines the epoch (one pass over it).
    splits: ClassVar[tuple[str, ...]] = ("forget",)
    # Splits on which the frozen reference model also runs (empty: no reference model is built).
    reference_splits: ClassVar[tuple[str, ...]] = ()
    # "sum": total = sum of objectives, one backward. "mgda": min-norm common descent direction.
    combine: ClassVar[str] = "sum"
    # "model": train the model itself. "assistant": train a small assistant (ULD); evaluation then
    # scores target − alpha·assistant, with the method's params.alpha and params.filter_rate.
    trains: ClassVar[str] = "model"
    # Search space used when a spec names the method without one. Keys are method params or the trainer
    # settings lr, epochs, weight_decay. Values: {"grid"|"choice": [...]} or
    # {"uniform"|"loguniform"|"randint": [low, high]}.
    default_space: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, params: Any) -> None:
        self.params = params

    @property
    def hidden_layer(self) -> int | None:
        """Decoder layer whose output the worker hands over as ModelOutput.hidden (None: not needed)."""
        return None

    def trainable(self, parameter_name: str) -> bool:
        """Whether a parameter of the trained module is updated (RMU restricts this)."""
        return True

    def objectives(self, inputs: MethodInputs) -> dict[str, torch.Tensor]:
        """Named scalar objectives to minimise (coefficients already applied for ``combine = "sum"``)."""
        raise NotImplementedError


# ---------------------------------------------------------------- registry
_REGISTRY: dict[str, type[UnlearningMethod]] = {}


def register_method(name: str) -> Callable[[type[UnlearningMethod]], type[UnlearningMethod]]:
    """Class decorator: make a method sweepable under ``name`` (the spec's ``method:`` value)."""

    def decorate(cls: type[UnlearningMethod]) -> type[UnlearningMethod]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        if not dataclasses.is_dataclass(cls.Params):
            raise TypeError(f"method {name!r}: Params must be a dataclass")
        unknown = set(cls.splits + cls.reference_splits) - set(SPLITS)
        if unknown:
            raise ValueError(f"method {name!r}: unknown splits {sorted(unknown)}; known: {SPLITS}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[UnlearningMethod]:
    if name not in _REGISTRY:  # the method files register themselves when imported
        from methods.catalog import load_method_files

        load_method_files()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(method_names())}")
    return _REGISTRY[name]


def param_names(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(get_method_class(name).Params)]


def build_method(name: str, **params: Any) -> UnlearningMethod:
    """Instantiate a registered method; unknown hyperparameters are an error naming the known ones."""
    cls = get_method_class(name)
    known = set(param_names(name))
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"method {name!r} has no hyperparameter {unknown[0]!r}; known: {', '.join(sorted(known))}")
    return cls(cls.Params(**params))


# ---------------------------------------------------------------- shared terms
def answer_token_logprobs(out: ModelOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label token under the logits and the mask of answer tokens.

    Returns ([batch, seq-1] log-probs, [batch, seq-1] float mask); position t scores token t+1.
    """
    logits = out.logits[:, :-1, :].float()
    labels = out.labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe_labels = labels.masked_fill(~mask, 0)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return logprobs * mask, mask.to(logprobs.dtype)


def sequence_logprob(out: ModelOutput) -> torch.Tensor:
    """log π(y|x): SUM of answer-token log-probs, per example [batch]."""
    logprobs, mask = answer_token_logprobs(out)
    return logprobs.sum(-1)


def answer_lengths(out: ModelOutput) -> torch.Tensor:
    """|y|: number of answer tokens per example [batch] (at least 1, so divisions are safe)."""
    _, mask = answer_token_logprobs(out)
    return mask.sum(-1).clamp(min=1.0)


def mean_token_prob(out: ModelOutput) -> torch.Tensor:
    """P̄(y|x): mean over answer tokens of the token PROBABILITY, per example [batch] (FLAT)."""
    logprobs, mask = answer_token_logprobs(out)
    return (logprobs.exp() * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def nll(out: ModelOutput) -> torch.Tensor:
    """Mean answer-token cross-entropy over the batch (the token-level mean an HF causal-LM loss takes)."""
    logprobs, mask = answer_token_logprobs(out)
    return -logprobs.sum() / mask.sum().clamp(min=1.0)


def kl_to_reference(policy: ModelOutput, reference: ModelOutput) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) per token over every non-padding position, averaged over those positions."""
    log_p = torch.log_softmax(policy.logits.float(), dim=-1)
    log_ref = torch.log_softmax(reference.logits.float(), dim=-1)
    per_token = F.kl_div(log_p, log_ref, log_target=True, reduction="none").sum(-1)  # [batch, seq]
    mask = policy.attention_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
