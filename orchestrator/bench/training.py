"""P1 orchestration tax, P2 ULD vs NPO, P3 utilisation and P6 memory: the worker loop measured side by side."""
from __future__ import annotations

import statistics

from orchestrator.bench.processes import ray_trial, start_ray
from orchestrator.bench.sizes import Bench
from orchestrator.bench.table import BenchRow, measured
from orchestrator.local_run import THREADS, run_processes
from orchestrator.measure import (
    epoch_costs,
    steady,
    steady_tokens_per_second,
    training_flops_per_token,
)

MB = 1024 * 1024


def measure_orchestration(bench: Bench) -> tuple[list[BenchRow], float]:
    """P1; also returns the plain loop's steady tokens/s for P3."""
    config = bench.trial_config("ga", {}, "p1", epochs=bench.size.throughput_epochs, lr=1e-5)
    # More steps per epoch than the 8-row forget split: GA over the 80 rows of `full`; evaluation only
    # after the last epoch and without generation (it is outside the timed epochs either way).
    config["benchmark"] = dict(config["benchmark"], forget_split="full")
    config["evaluation"] = dict(config["evaluation"], every=0, generation=False)
    bench.log("P1: the worker loop in a plain process (gloo, world size 1)")
    plain = run_processes([config], 1, bench.work / "p1-plain.log")
    bench.log("P1: starting Ray, then the same loop as a 1-worker Ray Train trial")
    start_ray(bench.work / "ray")
    on_ray = ray_trial(config, bench.work / "ray-results", "p1-ray")
    plain_rate = steady_tokens_per_second(epoch_costs(plain.ranks[0]["reports"]))
    ray_rate = steady_tokens_per_second(epoch_costs(on_ray.ranks[0]["reports"]))
    rows = [
        measured("P1 orchestration", "tokens/s, 1-worker Ray Train trial (goal ratio ≥ 0.95)", ray_rate,
                 "tokens/s", "same loop, plain process", plain_rate),
        measured("P1 orchestration", "gang start: launch → loop entered, Ray Train", on_ray.ranks[0]["entered"] - on_ray.launched,
                 "s", "plain process start", plain.ranks[0]["entered"] - plain.launched),
        measured("P1 orchestration", f"trial wall time ({bench.size.throughput_epochs} epochs + final evaluation), Ray Train",
                 on_ray.finished - on_ray.launched, "s", "plain process", plain.finished - plain.launched),
    ]
    return rows, plain_rate


def measure_utilisation(bench: Bench, tokens_per_second: float, peak: float) -> list[BenchRow]:
    """P3: 6·N·tokens + attention FLOPs per second over the fp32 matmul peak at the same thread count."""
    from orchestrator.data import load_benchmark
    from orchestrator.encoding import encode_pair
    from orchestrator.models import load_model, load_tokenizer

    model = load_model(bench.prepared.model_path)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # GA trains everything
    tokenizer = load_tokenizer(bench.prepared.tokenizer_path)
    b = bench.spec.benchmark
    rows = load_benchmark("embedded", seed=bench.spec.seed, num_authors=b.num_authors,
                          questions_per_author=b.questions_per_author)["full"]
    # T: mean length of the P1 training sequences (what one token attends over, at most).
    seq_len = statistics.mean(len(encode_pair(tokenizer, r["question"], r["answer"], bench.spec.model.prompt_template,
                                              bench.spec.training.max_length).input_ids) for r in rows)
    c = model.config
    per_token = training_flops_per_token(trainable, c.num_hidden_layers, c.hidden_size, seq_len)
    bench.log(f"P3: {trainable:,} trainable parameters, T = {seq_len:.1f}, {per_token:,.0f} FLOP/token, "
              f"matmul peak {peak / 1e9:.1f} GFLOP/s")
    return [
        measured("P3 utilisation", "achieved training FLOP/s, plain worker loop (P1)", per_token * tokens_per_second,
                 "FLOP/s", f"fp32 matmul peak, {bench.size.matmul_size}² at {THREADS} thread", peak),
        measured("P3 utilisation", f"FLOP per trained token: 6·N + 12·L·H·T, N={trainable:,} L={c.num_hidden_layers} "
                 f"H={c.hidden_size} T={seq_len:.1f}", per_token, "FLOP/token"),
    ]


def measure_uld_vs_npo(bench: Bench) -> list[BenchRow]:
    """P2: per-epoch wall seconds of ULD's assistant training vs NPO+GD's, on the same forget split."""
    epochs = bench.size.unlearn_epochs
    npo = bench.trial_config("npo", {"alpha": 1.0}, "p2-npo", epochs=epochs)
    uld = bench.trial_config("uld", {"lora_rank": 16, "lora_alpha": 16.0}, "p2-uld", epochs=epochs, lr=1e-3)
    costs = {}
    for name, config in (("npo", npo), ("uld", uld)):
        bench.log(f"P2: {name} for {epochs} epochs with per-epoch evaluation (plain process)")
        run = run_processes([config], 1, bench.work / f"p2-{name}.log")
        costs[name] = steady(epoch_costs(run.ranks[0]["reports"]))

    def per_epoch(name: str, with_eval: bool) -> float:
        return statistics.median(c.train_seconds + (c.eval_seconds if with_eval else 0.0) for c in costs[name])

    def per_step(name: str) -> float:
        return statistics.median(c.train_seconds / c.steps for c in costs[name] if c.steps)

    where = f"{bench.spec.benchmark.forget_split}, 1 worker, median of epochs 2–{epochs}" if epochs > 1 else "1 worker"
    return [
        measured("P2 ULD vs NPO", f"train s/epoch, ULD ({where}; paper: ratio ≤ 1/3)", per_epoch("uld", False),
                 "s", "NPO+GD", per_epoch("npo", False)),
        measured("P2 ULD vs NPO", f"train + evaluation s/epoch, ULD ({where})", per_epoch("uld", True),
                 "s", "NPO+GD", per_epoch("npo", True)),
        # ULD's epoch walks its augmented forget set (3 pairs per forget pair): per step tells the two apart.
        measured("P2 ULD vs NPO", f"train s/optimizer step, ULD ({costs['uld'][0].steps} steps/epoch vs "
                 f"{costs['npo'][0].steps})", per_step("uld"), "s", "NPO+GD", per_step("npo")),
    ]


def measure_memory(bench: Bench) -> list[BenchRow]:
    """P6: peak RSS per worker, ZeRO-0/2/3, 2 gloo workers fine-tuning a wider model for one epoch."""
    from orchestrator.models import build_embedded_model, load_tokenizer
    from orchestrator.prepare import finetune_config

    hidden, layers = bench.size.memory_model
    tokenizer = load_tokenizer(bench.prepared.tokenizer_path)
    model = build_embedded_model(len(tokenizer), hidden, layers, max(1, hidden // 64), 4 * hidden, 256, 0)
    parameters = sum(p.numel() for p in model.parameters())
    path = bench.work / f"memory-h{hidden}-l{layers}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    stages: dict[int, tuple[float, float]] = {}
    for stage in (0, 2, 3):
        config = finetune_config(bench.spec, str(path), str(path), [bench.spec.benchmark.forget_split], None)
        config["scaling"] = dict(config["scaling"], zero_stage=stage, num_workers=2)
        config["training"] = dict(config["training"], epochs=1, batch_size=4)
        bench.log(f"P6: ZeRO-{stage}, 2 workers, hidden {hidden} × {layers} layers ({parameters:,} parameters)")
        run = run_processes([config], 2, bench.work / f"p6-zero{stage}.log", sample_memory=True)
        stages[stage] = (max(r["peak_rss"] for r in run.ranks) / MB,
                         max(r["peak_rss"] - r["entry_rss"] for r in run.ranks) / MB)
    rows = [measured("P6 memory", f"model states, 16 B/param (fp32 weights, grads, Adam m and v), {parameters:,} params",
                     16 * parameters / MB, "MB")]
    for stage, (peak, growth) in stages.items():
        baseline, peak0, growth0 = (None, None, None) if stage == 0 else ("ZeRO-0", *stages[0])
        rows += [
            measured("P6 memory", f"peak RSS per worker, ZeRO-{stage} (2 workers)", peak, "MB", baseline, peak0),
            measured("P6 memory", f"RSS growth in the loop per worker (peak − after imports), ZeRO-{stage}", growth, "MB",
                     baseline, growth0),
        ]
    return rows
