"""Min-norm common descent direction (MGDA, dual form) over named objectives, data-parallel and ZeRO-aware.

With g_i the gradient of objective i, the weights λ on the simplex minimise ‖Σ λ_i g_i‖² and the update
steps along −d, d = Σ λ_i g_i: ⟨d, g_i⟩ ≥ ‖d‖² for every i, so no objective increases to first order
(d = 0 exactly at a Pareto-stationary point).
One guard: an objective whose gradient is rounding noise (an objective sitting at its minimum, like the KL
to the reference before the first step) is left out of the hull until its gradient is real.

Data parallel: the gradient an optimizer step uses is the MEAN over workers of their local gradients, so
the Gram matrix G_ij = ⟨g_i, g_j⟩ must be taken over those means. Each worker

  1. computes the gradient of one objective on its micro-batch (autograd.grad, graph retained),
  2. reduce-scatters it so it keeps only its 1/N piece of the mean gradient (memory: one full gradient
     at a time plus k pieces),
  3. after all objectives, forms the k×k partial Gram of its pieces; an all-reduce (sum) gives every
     worker the Gram of the full mean gradients, so all solve the same λ,
  4. calls ``backward(Σ w_i L_i)`` ONCE; the ordinary data-parallel averaging of that backward (DeepSpeed's
     reduce-scatter under ZeRO-2/3) then yields d = Σ w_i ḡ_i.

DeepSpeed (0.19): an engine supports one backward per forward, and the k extra passes would otherwise
(a) run the engine's backward prologue/epilogue from hooks on the model outputs (under ZeRO-1/2 the
epilogue reduces gradient buckets that do not exist yet) and (b) find ZeRO-3 parameters released by the
first pass (the fetch hooks re-gather once per forward; DeepSpeed issue #7352). When ``backward`` is an
engine's bound ``backward``, the extra passes therefore run flagged as inside the engine's own backward and
ZeRO-3's per-module hook counters are re-armed before every pass. Both touch engine internals; the
2-worker ZeRO-2/3 equality test (tests/test_multiobjective.py) is the guard when DeepSpeed is upgraded.
Not supported: reentrant activation checkpointing (autograd.grad refuses it; use_reentrant=False works).
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

# Elements per reduce-scatter: large enough to amortise a collective, small next to a model's gradient.
BUCKET_NUMEL = 1 << 24
# Elements per float64 block when forming the Gram of the pieces (bounds the float64 copy).
GRAM_BLOCK = 1 << 22
MAX_OBJECTIVES = 10  # exact face enumeration costs 2^k small solves
# A gradient this small next to the largest is rounding noise of an objective at its minimum (float32
# eps ≈ 1.2e-7): KL(p_ref ‖ p_θ) at θ = θ_ref has ‖g‖ ≈ 1e-8 of the others. Kept in the hull, it would be
# the min-norm point — λ ≈ 1 on it and a step of zero (or, rescaled to equal norm, along noise) — so the
# method never left the reference. Such objectives get weight 0 until their gradient is real.
NEGLIGIBLE_GRADIENT = 1e-6


# ---------------------------------------------------------------- the min-norm problem
def min_norm_weights(gram: torch.Tensor) -> torch.Tensor:
    """λ on the simplex minimising λᵀ G λ for a k×k Gram matrix G (float64, on the CPU).

    Exact: k = 2 in closed form; larger k by enumerating the simplex's faces (every vertex, every edge in
    closed form, and for bigger faces the minimiser over the face's affine hull, from its KKT system, kept
    when it is non-negative) and taking the best. A convex quadratic attains its minimum on the simplex
    at the affine-hull minimiser of some face (of the smallest face containing a minimiser); when that
    minimiser is not unique, the minimisers form a line reaching a smaller face, which the enumeration
    covers. Every candidate is feasible and scored by its exact λᵀGλ, so ill-conditioning can cost
    accuracy but never feasibility. Ties go to the first candidate: deterministic.
    """
    g = _validated_gram(gram)
    k = g.shape[0]
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    if k == 2:
        first = _pair_weight(g[0, 0], g[0, 1], g[1, 1])
        return torch.stack([first, 1.0 - first])
    best, best_value = None, None
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            candidate = _face_minimiser(g, support)
            if candidate is None:
                continue
            value = candidate @ g @ candidate
            if best_value is None or value < best_value:
                best, best_value = candidate, value
    return best


def _validated_gram(gram: torch.Tensor) -> torch.Tensor:
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"a Gram matrix must be square and non-empty, got shape {tuple(gram.shape)}")
    if gram.shape[0] > MAX_OBJECTIVES:
        raise ValueError(f"at most {MAX_OBJECTIVES} objectives (exact enumeration of 2^k faces), got {gram.shape[0]}")
    g = gram.detach().to("cpu", torch.float64)
    if not torch.isfinite(g).all():
        raise ValueError("the Gram matrix has non-finite entries (a gradient overflowed)")
    return (g + g.T) / 2  # summed partial Grams can differ from symmetric by rounding


def _pair_weight(g11: torch.Tensor, g12: torch.Tensor, g22: torch.Tensor) -> torch.Tensor:
    """λ₁ minimising ‖λ₁ g₁ + (1 − λ₁) g₂‖²: clip((g₂ − g₁)·g₂ / ‖g₁ − g₂‖², 0, 1) in Gram entries."""
    distance = g11 - 2 * g12 + g22  # ‖g₁ − g₂‖²
    if distance <= 1e-12 * (g11 + g22):  # equal gradients: every λ gives the same direction
        return torch.tensor(0.5, dtype=torch.float64)
    return ((g22 - g12) / distance).clamp(0.0, 1.0)


def _face_minimiser(g: torch.Tensor, support: tuple[int, ...]) -> torch.Tensor | None:
    """The minimiser of λᵀGλ over the face spanned by ``support`` (None when it lies outside the face)."""
    k = g.shape[0]
    weights = torch.zeros(k, dtype=torch.float64)
    if len(support) == 1:
        weights[support[0]] = 1.0
        return weights
    if len(support) == 2:
        i, j = support
        first = _pair_weight(g[i, i], g[i, j], g[j, j])
        weights[i], weights[j] = first, 1.0 - first
        return weights
    index = torch.tensor(support)
    sub = g[index][:, index]
    sub = sub / sub.diagonal().sum().clamp(min=torch.finfo(torch.float64).tiny)  # same λ, better conditioned
    # Stationarity on the face's affine hull (Σλ = 1): [G_S 1; 1ᵀ 0]·[λ; ν] = [0; 1]. The system is regular
    # exactly when that minimiser is unique; otherwise the minimisers form a line that reaches a smaller face.
    n = len(support)
    kkt = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    kkt[:n, :n], kkt[:n, n], kkt[n, :n] = sub, 1.0, 1.0
    rhs = torch.zeros(n + 1, dtype=torch.float64)
    rhs[n] = 1.0
    try:
        solution = torch.linalg.solve(kkt, rhs)[:n]
    except RuntimeError:  # singular
        return None
    if not torch.isfinite(solution).all() or (solution < 0).any():
        return None  # outside the face: its minimiser lies on a smaller face
    weights[index] = solution / solution.sum()
    return weights


def equal_norm_scales(gram: torch.Tensor) -> torch.Tensor:
    """s_i = mean‖g‖ / ‖g_i‖: rescales every gradient to the mean norm (0 for a zero gradient).

    The mean norm rather than 1 keeps the step's size in the units of the gradients, so the learning rate
    keeps its meaning, and makes the effective weights λ_i·s_i invariant to a common factor on all
    gradients (loss scaling, DeepSpeed's 1/gradient-accumulation scaling of extra passes).
    """
    norms = gram.diagonal().clamp(min=0.0).sqrt()
    nonzero = norms > 0
    if not nonzero.any():
        return torch.ones_like(norms)
    mean_norm = norms[nonzero].mean()
    return torch.where(nonzero, mean_norm / norms.clamp(min=torch.finfo(norms.dtype).tiny), torch.zeros_like(norms))


def common_descent_weights(gram: torch.Tensor, normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ, w) for the Gram matrix of the objectives' gradients: d = Σ w_i g_i is the update direction.

    Objectives with a negligible gradient (NEGLIGIBLE_GRADIENT) get λ = w = 0; the others' λ solve the
    min-norm problem, on the gradients rescaled to equal norm (s = ``equal_norm_scales``) when
    ``normalize``, and w = λ·s (w = λ without normalisation).
    """
    gram = _validated_gram(gram)
    norms = gram.diagonal().clamp(min=0.0).sqrt()
    kept = norms > NEGLIGIBLE_GRADIENT * norms.max()
    if not kept.any():  # every gradient is zero: nothing to balance
        kept = torch.ones_like(kept)
    sub = gram[kept][:, kept]
    scales = equal_norm_scales(sub) if normalize else torch.ones(int(kept.sum()), dtype=torch.float64)
    lambdas = torch.zeros(len(norms), dtype=torch.float64)
    weights = torch.zeros(len(norms), dtype=torch.float64)
    lambdas[kept] = min_norm_weights(scales[:, None] * sub * scales[None, :])
    weights[kept] = lambdas[kept] * scales
    return lambdas, weights


# ---------------------------------------------------------------- one data-parallel step
def common_descent_backward(
    objectives: dict[str, torch.Tensor],
    parameters: list[torch.nn.Parameter],
    backward: Callable[[torch.Tensor], Any],
    normalize: bool = False,
    group: Any = None,
) -> dict[str, float]:
    """Back-propagate the min-norm common descent direction of ``objectives`` into ``parameters``' gradients.

    ``backward`` runs the final, single backward of Σ w_i L_i: ``engine.backward`` under DeepSpeed (then the
    engine's reduction averages it over workers), or ``torch.Tensor.backward`` without. ``group``: the
    data-parallel process group (default: the whole world; ignored when torch.distributed is not
    initialised). The weights come from ``common_descent_weights``: λ by objective name, and with
    ``normalize`` (gradients rescaled to equal norm) also the effective weights w_i = λ_i·s_i as
    ``weight.<name>``. Every worker must pass the same objective names in the same order.
    """
    if not objectives:
        raise ValueError("common_descent_backward needs at least one objective")
    names = list(objectives)
    passes = _EnginePasses.for_backward(backward)
    world, rank = _world(group)
    pieces = []
    for name in names:
        with passes.extra_pass():
            grads = _local_gradient(objectives[name], parameters)
        pieces.append(_piece_of_mean(grads, world, rank, group))
    gram = _partial_gram(pieces)
    if world > 1:
        dist.all_reduce(gram, group=group)
    del pieces
    lambdas, weights = common_descent_weights(gram.cpu(), normalize)
    passes.before_final_pass()
    backward(sum(float(w) * objectives[name] for name, w in zip(names, weights)))
    result = {name: float(value) for name, value in zip(names, lambdas)}
    if normalize:
        result.update({f"weight.{name}": float(value) for name, value in zip(names, weights)})
    return result


def _world(group: Any) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _local_gradient(objective: torch.Tensor, parameters: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """∂objective/∂p on this worker's micro-batch, full-shaped for every parameter (zeros where unused).

    Under ZeRO-3 a parameter's ``data`` is only this worker's partition outside its module's forward and
    backward, but the gradient autograd returns has the full shape ``ds_shape``.
    """
    if objective.requires_grad:
        grads = list(torch.autograd.grad(objective, parameters, retain_graph=True, allow_unused=True))
    else:  # an objective no trained parameter influences
        grads = [None] * len(parameters)
    for index, (grad, parameter) in enumerate(zip(grads, parameters)):
        if grad is None:
            shape = getattr(parameter, "ds_shape", parameter.shape)
            grads[index] = torch.zeros(shape, dtype=torch.float32, device=parameter.device)
    return grads


def _piece_of_mean(grads: list[torch.Tensor], world: int, rank: int, group: Any) -> torch.Tensor:
    """This worker's 1/world piece of the mean over workers of the flattened gradient [≈ numel / world].

    Bucket by bucket: each bucket is reduce-scattered and this worker keeps its slice, so the pieces of
    all workers partition the coordinates and their partial dot products sum to the full ones. ``grads`` is
    consumed (entries freed as they are packed) to hold one gradient at a time.
    """
    pieces, bucket, bucket_numel = [], [], 0
    for index in range(len(grads)):
        bucket.append(grads[index].reshape(-1).float())
        bucket_numel += bucket[-1].numel()
        grads[index] = None
        if bucket_numel >= BUCKET_NUMEL or index == len(grads) - 1:
            pieces.append(_reduce_scatter_mean(torch.cat(bucket), world, rank, group))
            bucket, bucket_numel = [], 0
    return torch.cat(pieces)


def _reduce_scatter_mean(flat: torch.Tensor, world: int, rank: int, group: Any) -> torch.Tensor:
    if world == 1:
        return flat
    padding = (-flat.numel()) % world
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    piece = flat.new_empty(flat.numel() // world)
    try:
        dist.reduce_scatter_tensor(piece, flat, group=group)
    except (RuntimeError, NotImplementedError):  # backends without reduce-scatter (older gloo)
        dist.all_reduce(flat, group=group)
        piece = flat.view(world, -1)[rank].clone()
    return piece / world


def _partial_gram(pieces: list[torch.Tensor]) -> torch.Tensor:
    """k×k Gram of this worker's pieces, accumulated in float64 block by block (the sum over workers is G)."""
    k, numel = len(pieces), pieces[0].numel()
    gram = torch.zeros(k, k, dtype=torch.float64, device=pieces[0].device)
    for start in range(0, numel, GRAM_BLOCK):
        block = torch.stack([piece[start:start + GRAM_BLOCK] for piece in pieces]).double()  # [k, block]
        gram += block @ block.T
    return gram


# ---------------------------------------------------------------- DeepSpeed: several backward passes
class _EnginePasses:
    """Lets a DeepSpeed engine see k + 1 backward passes over one forward as a single backward (see above)."""

    # Per-module counters ZeRO-3's hooks set in forward and count down in backward: the pre-backward
    # re-gather runs while applied_pre_backward_ref_cnt > 0, the post-backward release when
    # ds_grads_remaining reaches 0.
    ZERO3_COUNTERS = ("applied_pre_backward_ref_cnt", "ds_grads_remaining")

    def __init__(self, engine: Any = None) -> None:
        self.engine = engine
        self.counters: list[tuple[torch.nn.Module, str, int]] = []
        module = getattr(engine, "module", None)
        if module is not None:
            self.counters = [(m, key, m.__dict__[key]) for m in module.modules()
                             for key in self.ZERO3_COUNTERS if key in m.__dict__]
        self.passes = 0

    @classmethod
    def for_backward(cls, backward: Callable) -> "_EnginePasses":
        """Engine support when ``backward`` is a DeepSpeed engine's bound method, else a no-op."""
        engine = getattr(backward, "__self__", None)
        is_engine = engine is not None and hasattr(engine, "module") and hasattr(engine, "optimizer")
        return cls(engine if is_engine else None)

    def _rearm_zero3_hooks(self) -> None:
        if self.passes:  # the forward armed them for the first pass
            for module, key, value in self.counters:
                module.__dict__[key] = value
        self.passes += 1

    @contextmanager
    def extra_pass(self) -> Iterator[None]:
        """A per-objective pass: the engine's output hooks take it for part of its own backward, so they
        neither run an epilogue (reductions) after it nor refuse it (ZeRO-0 allows only engine.backward)."""
        self._rearm_zero3_hooks()
        engine = self.engine
        if engine is None or not hasattr(engine, "_running_engine_backward"):
            yield
            return
        previous = engine._running_engine_backward
        engine._running_engine_backward = True
        try:
            yield
        finally:
            engine._running_engine_backward = previous

    def before_final_pass(self) -> None:
        self._rearm_zero3_hooks()
