"""The min-norm (MGDA) solver against brute force over the simplex, the one-step backward against a float64
transcription, and — marked integration — N data-parallel workers (plain gloo, DeepSpeed ZeRO-2 and ZeRO-3)
against one process on the whole batch.
"""
from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from orchestrator import multiobjective
from orchestrator.multiobjective import (
    common_descent_backward,
    common_descent_weights,
    equal_norm_scales,
    min_norm_weights,
)


# ---------------------------------------------------------------- the min-norm problem
def simplex_grid(k: int, step: float) -> torch.Tensor:
    """Every point of the simplex whose coordinates are multiples of ``step`` [points, k], float64."""
    n = round(1 / step)
    ticks = torch.arange(n + 1, dtype=torch.float64)
    if k == 2:
        first = ticks / n
        return torch.stack([first, 1 - first], dim=1)
    a, b = torch.meshgrid(ticks, ticks, indexing="ij")
    keep = (a + b) <= n
    a, b = a[keep] / n, b[keep] / n
    return torch.stack([a, b, (1 - a - b).clamp(min=0)], dim=1)


def random_grams(k: int, count: int, seed: int) -> list[torch.Tensor]:
    """G = AᵀA for random A with 1..4 rows, so low-rank (degenerate) Grams are frequent."""
    generator = torch.Generator().manual_seed(seed)
    grams = []
    for _ in range(count):
        rows = int(torch.randint(1, 5, (1,), generator=generator))
        scale = 10.0 ** float(torch.randint(-3, 3, (1,), generator=generator))
        a = scale * torch.randn(rows, k, generator=generator, dtype=torch.float64)
        grams.append(a.T @ a)
    return grams


@pytest.mark.parametrize("k, step", [(2, 1e-4), (3, 1e-3)])
def test_min_norm_weights_beat_brute_force_over_the_simplex(k, step):
    grid = simplex_grid(k, step)
    for gram in random_grams(k, 50, seed=k):
        weights = min_norm_weights(gram)
        assert weights.dtype == torch.float64 and weights.shape == (k,)
        assert (weights >= 0).all() and float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
        solver = float(weights @ gram @ weights)
        brute = float(torch.einsum("pi,ij,pj->p", grid, gram, grid).min())
        # The solver is exact, so it may only beat the grid; tolerance for float64 rounding of λᵀGλ.
        assert solver <= brute * (1 + 1e-6) + 1e-12 * float(gram.trace())


def test_min_norm_weights_known_cases():
    assert min_norm_weights(torch.tensor([[4.0]])).tolist() == [1.0]
    # Orthogonal g with ‖g_i‖² = 1, 4, 4: minimise Σ λ_i² n_i² on the simplex → λ_i ∝ 1/n_i² = (1, ¼, ¼)/1.5.
    weights = min_norm_weights(torch.diag(torch.tensor([1.0, 4.0, 4.0])))
    assert weights.tolist() == pytest.approx([2 / 3, 1 / 6, 1 / 6], abs=1e-12)
    # g₂ = −g₁: ½g₁ + ½g₂ = 0.
    assert min_norm_weights(torch.tensor([[1.0, -1.0], [-1.0, 1.0]])).tolist() == pytest.approx([0.5, 0.5])
    # g₁ = (1, 0), g₂ = (1, 1): λ₁ = (g₂ − g₁)·g₂ / ‖g₁ − g₂‖² = 1 / 1 clipped to 1 → d = g₁ (g₁·g₂ ≥ ‖g₁‖²).
    assert min_norm_weights(torch.tensor([[1.0, 1.0], [1.0, 2.0]])).tolist() == pytest.approx([1.0, 0.0])
    # g₁ = (1, 0), g₂ = (0, 2), g₃ = (1, 1) — g₃ is in the hull's interior direction: the minimiser is on the
    # g₁–g₂ edge, λ₁ = (4 − 0)/(1 + 4) = 0.8.
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    assert min_norm_weights(g @ g.T).tolist() == pytest.approx([0.8, 0.2, 0.0], abs=1e-12)


@pytest.mark.parametrize("gram", [torch.zeros(2, 3), torch.zeros(0, 0),
                                  torch.tensor([[1.0, float("nan")], [0.0, 1.0]])])
def test_min_norm_weights_rejects_bad_grams(gram):
    with pytest.raises(ValueError):
        min_norm_weights(gram)


def test_equal_norm_scales():
    # ‖g‖ = 1, 3, 0: mean of the non-zero norms 2 → scales 2, ⅔, 0; a common factor leaves them unchanged.
    gram = torch.diag(torch.tensor([1.0, 9.0, 0.0], dtype=torch.float64))
    assert equal_norm_scales(gram).tolist() == pytest.approx([2.0, 2 / 3, 0.0])
    assert equal_norm_scales(25.0 * gram).tolist() == pytest.approx([2.0, 2 / 3, 0.0])


# ---------------------------------------------------------------- one step, one process
def tiny_net(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(dtype)


def net_objectives(net: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = net(x)
    return {
        "first": out[:, 0].pow(2).mean(),
        "second": -out[:, 1].mean(),
        "bias_only": (net[2].bias - 1.0).pow(2).sum(),  # no gradient for the first layer (None → zeros)
    }


@pytest.mark.parametrize("normalize", [False, True])
def test_backward_leaves_the_min_norm_direction_in_grad(normalize):
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    net = tiny_net()
    weights = common_descent_backward(net_objectives(net, x), list(net.parameters()), torch.Tensor.backward, normalize)

    # float64 transcription: each objective's gradient on a float64 copy; the returned λ checked against brute
    # force and the optimality condition below; then p.grad must be d = Σ λ_i s_i g_i.
    net64 = tiny_net(torch.float64)
    objectives64 = net_objectives(net64, x.double())
    grads = []
    for value in objectives64.values():
        parts = torch.autograd.grad(value, list(net64.parameters()), retain_graph=True, allow_unused=True)
        grads.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                for g, p in zip(parts, net64.parameters())]))
    g = torch.stack(grads)  # [k, numel]
    norms = g.norm(dim=1)
    scales = norms.mean() / norms if normalize else torch.ones(3, dtype=torch.float64)
    scaled = g * scales[:, None]
    lambdas = torch.tensor([weights[name] for name in objectives64], dtype=torch.float64)
    brute = (simplex_grid(3, 1e-3) @ scaled).norm(dim=1).min()
    assert float((lambdas @ scaled).norm()) <= float(brute) * (1 + 1e-6)
    direction = (lambdas * scales) @ g
    got = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).double()
    assert torch.allclose(got, direction, rtol=1e-5, atol=1e-6)
    if normalize:
        assert [weights[f"weight.{name}"] for name in objectives64] == pytest.approx((lambdas * scales).tolist())
    else:
        assert not any(name.startswith("weight.") for name in weights)
    # The min-norm point d of the hull satisfies ⟨d, ĝ_i⟩ ≥ ‖d‖² for every (rescaled) gradient: a common
    # descent direction (−d decreases every objective to first order).
    # This is also the optimality condition of the min-norm problem, so it checks λ exactly.
    d = lambdas @ scaled
    assert ((scaled @ d) >= d @ d - 1e-9 * float(scaled.pow(2).sum())).all()


def test_objective_without_trainable_dependence_is_left_out():
    net = tiny_net()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    objectives = {"fit": net(x).pow(2).mean(), "constant": torch.tensor(2.0)}
    weights = common_descent_backward(objectives, list(net.parameters()), torch.Tensor.backward)
    # Pure MGDA would put all weight on the zero gradient and never move; it is left out instead.
    assert weights == {"fit": 1.0, "constant": 0.0}
    net_again = tiny_net()
    expected = torch.autograd.grad(net_again(x).pow(2).mean(), list(net_again.parameters()))
    for p, g in zip(net.parameters(), expected):
        assert torch.allclose(p.grad, g)


def test_negligible_gradients_get_no_weight():
    # ‖g‖ = 1, 1e-7 (rounding noise of an objective at its minimum), 2, pairwise orthogonal: the noise is
    # dropped and the other two solve as orthogonal gradients, λ ∝ 1/‖g‖² = (1, ¼)/1.25 = (0.8, 0.2).
    gram = torch.diag(torch.tensor([1.0, 1e-14, 4.0], dtype=torch.float64))
    lambdas, weights = common_descent_weights(gram)
    assert lambdas.tolist() == pytest.approx([0.8, 0.0, 0.2], abs=1e-12)
    assert weights.tolist() == lambdas.tolist()
    # Normalised: the kept gradients rescaled to their mean norm 1.5 (scales 1.5, 0.75) become orthogonal of
    # equal norm → λ = (½, ½), w = λ·s = (0.75, 0, 0.375).
    lambdas, weights = common_descent_weights(gram, normalize=True)
    assert lambdas.tolist() == pytest.approx([0.5, 0.0, 0.5], abs=1e-12)
    assert weights.tolist() == pytest.approx([0.75, 0.0, 0.375], abs=1e-12)
    # A gradient a thousandth of the largest is real: it is kept (and, small, takes most of λ).
    lambdas, _ = common_descent_weights(torch.diag(torch.tensor([1.0, 1e-6, 4.0], dtype=torch.float64)))
    assert lambdas[1] > 0.99


def test_no_objective_is_an_error():
    with pytest.raises(ValueError):
        common_descent_backward({}, list(tiny_net().parameters()), torch.Tensor.backward)


# ---------------------------------------------------------------- N workers vs one process
WORLD = 2
GLOBAL_BATCH = 4
LR = 0.1
# float32 gradients summed in a different order (per-worker partial sums, bucketed reduce-scatter) differ
# from the single process by ~1e-8 relative in the parameters; a small gradient's norm, and so its
# effective weight under normalisation, carries a few 1e-6 relative. 1e-5 (relative for weights, absolute
# for parameters) leaves room for that and nothing else.
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def global_batches(step: int) -> dict[str, dict[str, torch.Tensor]]:
    """Forget and retain batches of GLOBAL_BATCH rows. Every row has a 3-token prompt, 5 answer tokens and no
    padding, so each worker's half holds as many answer / non-padding tokens as the other and the mean of
    the halves' token means equals the whole batch's token mean (what the single process computes)."""
    generator = torch.Generator().manual_seed(100 + step)
    batches = {}
    for split in ("forget", "retain"):
        ids = torch.randint(0, 64, (GLOBAL_BATCH, 8), generator=generator)
        labels = ids.clone()
        labels[:, :3] = -100
        batches[split] = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    return batches


def mollm_objectives(method, model, reference, batches, one_forward: bool = False) -> dict[str, torch.Tensor]:
    """MOLLM's objectives; ``one_forward`` runs the policy once on all splits stacked (then every objective's
    backward pass goes through the same forward, the hardest case for ZeRO-3's once-per-forward hooks)."""
    from methods import MethodInputs, ModelOutput

    def run(module, batch):
        out = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return ModelOutput(out.logits, batch["labels"], batch["attention_mask"])

    if one_forward:
        stacked = run(model, {key: torch.cat([batches[split][key] for split in method.splits])
                              for key in ("input_ids", "labels", "attention_mask")})
        rows = len(batches[method.splits[0]]["input_ids"])  # every split has as many rows
        policy = {split: ModelOutput(*(t[i * rows:(i + 1) * rows] for t in (stacked.logits, stacked.labels,
                                                                            stacked.attention_mask)))
                  for i, split in enumerate(method.splits)}
    else:
        policy = {split: run(model, batches[split]) for split in method.splits}
    with torch.no_grad():
        ref = {split: run(reference, batches[split]) for split in method.reference_splits}
    return method.objectives(MethodInputs(policy=policy, reference=ref))


def rows_of(batches: dict, rank: int) -> dict:
    per_worker = GLOBAL_BATCH // WORLD
    part = slice(rank * per_worker, (rank + 1) * per_worker)
    return {split: {key: value[part] for key, value in batch.items()} for split, batch in batches.items()}


def normalize_at(step: int) -> bool:
    return step == 0  # step 0 with equal-norm gradients, step 1 plain MGDA: both paths in one run


def single_process(steps: int) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """The reference: one process, the whole global batch, the same SGD step."""
    from methods import build_method

    method = build_method("mollm")
    model = tiny_llama()
    reference = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    weights = []
    for step in range(steps):
        optimizer.zero_grad()
        objectives = mollm_objectives(method, model, reference, global_batches(step))
        weights.append(common_descent_backward(objectives, list(model.parameters()), torch.Tensor.backward,
                                               normalize=normalize_at(step)))
        optimizer.step()
    return weights, {name: p.detach().clone() for name, p in model.named_parameters()}


def init_worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)


def deepspeed_worker(rank: int, port: int, stage: int, one_forward: bool, steps: int, out_path: str) -> None:
    init_worker(rank, port)
    import deepspeed

    from methods import build_method

    # Skip DeepSpeed's JIT-built shared-memory all-reduce (a ~5 min C++ build on 2 cores); gloo does it all.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    method = build_method("mollm")
    model = tiny_llama()
    reference = copy.deepcopy(model).requires_grad_(False)
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // WORLD, "gradient_accumulation_steps": 1,
              # threshold 0: partition even the small parameters (kept whole, they would hide the re-gathering)
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    parameters = [p for p in engine.module.parameters() if p.requires_grad]
    weights = []
    for step in range(steps):
        objectives = mollm_objectives(method, engine, reference, rows_of(global_batches(step), rank), one_forward)
        weights.append(common_descent_backward(objectives, parameters, engine.backward, normalize=normalize_at(step)))
        engine.step()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # ZeRO-3: full tensors
        if rank == 0:
            params = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
            torch.save({"weights": weights, "params": params}, out_path)
    torch.distributed.destroy_process_group()


def gloo_worker(rank: int, port: int, steps: int, out_path: str) -> None:
    """Plain torch.distributed: loss.backward, then the all-reduce (mean) any data-parallel trainer does.

    It also takes the paths the DeepSpeed runs do not: many buckets, most padded to a multiple of WORLD,
    and a backend without reduce-scatter (the all-reduce + slice fallback).
    """
    init_worker(rank, port)
    import torch.distributed as dist

    from methods import build_method

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    multiobjective.BUCKET_NUMEL = 1000

    def unsupported(*args, **kwargs):
        raise RuntimeError("reduce_scatter_tensor unsupported")

    dist.reduce_scatter_tensor = unsupported
    method = build_method("mollm")
    model = tiny_llama()
    reference = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    weights = []
    for step in range(steps):
        optimizer.zero_grad()
        objectives = mollm_objectives(method, model, reference, rows_of(global_batches(step), rank))
        weights.append(common_descent_backward(objectives, list(model.parameters()), torch.Tensor.backward,
                                               normalize=normalize_at(step)))
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= WORLD
        optimizer.step()
    if rank == 0:
        torch.save({"weights": weights, "params": {n: p.detach().clone() for n, p in model.named_parameters()}},
                   out_path)
    # Both ranks tear gloo down together: rank 1 leaving while rank 0 still saved aborted it at exit now and
    # then ("terminate called without an active exception", SIGABRT; 1 run in 3 seen here).
    dist.barrier()
    dist.destroy_process_group()


def assert_same_as_single_process(out_path, steps: int) -> None:
    got = torch.load(out_path)
    weights, params = single_process(steps)
    for step in range(steps):
        assert set(got["weights"][step]) == set(weights[step])
        for name, value in weights[step].items():
            assert got["weights"][step][name] == pytest.approx(value, rel=TOLERANCE, abs=TOLERANCE), (step, name)
    for name, value in params.items():
        assert torch.allclose(got["params"][name], value, rtol=0, atol=TOLERANCE), name
    # the step really moved the parameters, and MGDA used more than one objective
    initial = dict(tiny_llama().named_parameters())
    assert any(not torch.equal(value, initial[name]) for name, value in params.items())
    assert sum(value > 1e-3 for name, value in weights[0].items() if "." not in name) >= 2


@pytest.mark.integration
def test_gloo_workers_match_one_process(tmp_path):
    out_path = str(tmp_path / "workers.pt")
    mp.spawn(gloo_worker, args=(free_port(), 2, out_path), nprocs=WORLD)
    assert_same_as_single_process(out_path, 2)


@pytest.mark.integration
@pytest.mark.parametrize("stage, one_forward", [(2, False), (3, False), (3, True)],
                         ids=["zero2", "zero3", "zero3-one-forward"])
def test_deepspeed_zero_workers_match_one_process(tmp_path, stage, one_forward):
    """Per-split forwards as the worker runs them; under ZeRO-3 also one forward for all splits."""
    out_path = str(tmp_path / "workers.pt")
    mp.spawn(deepspeed_worker, args=(free_port(), stage, one_forward, 2, out_path), nprocs=WORLD)
    assert_same_as_single_process(out_path, 2)
