"""``make bench``: speed, cost and memory figures, each measured beside its baseline in the same run.

    python -m orchestrator.bench [--quick] [--out DIR]

Writes ``bench.parquet`` and ``bench.md`` (one row per figure: section, figure, value, baseline,
baseline_value, ratio, unit, machine) and prints the table. Sections:

- P1 orchestration tax: the worker loop as a 1-worker Ray Train trial (TorchTrainer running
  ``train_loop_per_worker``) vs the same loop in a plain process (gloo, world size 1), same model, data
  and batch. Steady-state tokens/s come from the worker's own epoch stats (median over epochs after the
  first); gang start (launch → the loop is entered) and trial wall time are their own rows.
- P2 ULD vs NPO (NPO+GD: its retain NLL term on): wall seconds per unlearning epoch, train only and
  train + evaluation, same forget split, one worker, same epochs.
- P3 utilisation: achieved training FLOP/s of the plain loop over this machine's fp32 matmul peak
  (one n×n torch matmul at the workers' thread count), with ``training_flops_per_token``'s formula.
- P4 evaluation: the batched suite (``evaluate``) vs ``evaluate_per_sample`` on the same model and data,
  and how far their aggregates differ.
- P5 search efficiency: ASHA and Optuna vs the full grid on the same GA lr space (real Ray Tune sweeps
  on the cached prepared models): best score and worker-seconds.
- P6 memory: peak resident memory per worker for ZeRO-0/2/3 with 2 gloo workers on a wider model.

Everything short is repeated and reported as a median. Plain-process baselines run in spawned
subprocesses, so each side pays its own imports; Ray starts only after every Ray-free measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

PROJECT_ROOT = Path(__file__).resolve().parent.parent
THREADS = 1  # intra-op threads per process: the product's default (scaling.threads_per_worker)
MB = 1024 * 1024


# ---------------------------------------------------------------- the bench job and its two sizes
@dataclass(frozen=True)
class BenchSize:
    """What --quick shrinks; everything else is the same code path."""

    prepare_epochs: int  # fine-tuning epochs of the target/retain models (cached after the first run)
    throughput_epochs: int  # P1: epochs per side (the first is warm-up, the rest are repetitions)
    unlearn_epochs: int  # P2 and P5: epochs per trial
    eval_repeats: int  # P4: timed runs of the batched suite (seconds each)
    per_sample_repeats: int  # P4: timed runs of the one-at-a-time reference (~5× longer)
    lr_grid: tuple[float, ...]  # P5: the GA learning-rate grid
    optuna: bool  # P5: also an Optuna sweep (one more wave of trial start-ups)
    sweep_timeout: float  # P5: seconds a sweep may take before Ray is shut down under it
    memory_model: tuple[int, int]  # P6: (hidden size, layers)
    matmul_size: int  # P3: n of the n×n peak matmul


# Wall time is dominated by process and Ray gang start-ups (~30 s a trial on 2 cores), not by epochs.
FULL = BenchSize(prepare_epochs=10, throughput_epochs=8, unlearn_epochs=3, eval_repeats=3, per_sample_repeats=2,
                 lr_grid=(1e-5, 1e-4, 1e-3, 1e-2), optuna=True, sweep_timeout=420, memory_model=(384, 6),
                 matmul_size=2048)
QUICK = BenchSize(prepare_epochs=2, throughput_epochs=3, unlearn_epochs=2, eval_repeats=1, per_sample_repeats=1,
                  lr_grid=(1e-4, 1e-2), optuna=False, sweep_timeout=300, memory_model=(256, 4), matmul_size=1024)


def bench_spec(size: BenchSize, cache_dir: str, **sweep: Any) -> dict[str, Any]:
    """A small embedded job: 20 authors × 4 facts, a 4-layer Llama with hidden 64 (~0.2M parameters)
    that memorises its facts in ~1 min of prepare; every trial is one worker (two trials fit at once)."""
    return {
        "name": "bench", "seed": 0,
        "benchmark": {"source": "embedded", "num_authors": 20, "questions_per_author": 4,
                      "forget_split": "forget10", "retain_split": "retain90", "holdout_split": "holdout10"},
        "model": {"target": "embedded", "embedded": {"vocab_size": 512, "hidden_size": 64, "num_layers": 4,
                                                     "num_heads": 4, "intermediate_size": 128}},
        "prepare": {"epochs": size.prepare_epochs, "lr": 5e-3, "batch_size": 16, "cache_dir": cache_dir},
        "training": {"lr": 1e-4, "epochs": size.unlearn_epochs, "batch_size": 4, "max_length": 64,
                     "warmup_epochs": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.99, "zero_stage": 2},
        "evaluation": {"every": 1, "batch_size": 32, "max_new_tokens": 16, "verbmem_prefix_tokens": 8,
                       "verbmem_new_tokens": 16, "knowmem_new_tokens": 16},
        "sweep": sweep or {"methods": [{"name": "ga", "space": {"lr": {"grid": list(size.lr_grid)}}}]},
    }


# ---------------------------------------------------------------- rows and the table
@dataclass(frozen=True)
class BenchRow:
    section: str
    figure: str
    value: float | None
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None
    machine: str = ""


def ratio(value: float | None, baseline_value: float | None) -> float | None:
    """value / baseline, or None when either is missing, not finite, or the baseline is 0."""
    if value is None or baseline_value is None:
        return None
    if not (math.isfinite(value) and math.isfinite(baseline_value)) or baseline_value == 0:
        return None
    return value / baseline_value


def measured(section: str, figure: str, value: float | None, unit: str, baseline: str | None = None,
             baseline_value: float | None = None, comparable: bool = True) -> BenchRow:
    """A row; ``comparable=False`` for figures whose quotient means nothing (scores of either sign)."""
    return BenchRow(section, figure, value, unit, baseline, baseline_value,
                    ratio(value, baseline_value) if comparable else None)


def with_machine(rows: Sequence[BenchRow], machine: str) -> list[BenchRow]:
    return [BenchRow(**{**asdict(row), "machine": machine}) for row in rows]


def _number(value: float | None) -> str:
    if value is None:
        return "–"
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:,.4g}" if abs(value) >= 1000 else f"{value:.4g}"


def table_cells(row: BenchRow) -> list[str]:
    return [row.section, row.figure, _number(row.value), row.baseline or "", _number(row.baseline_value),
            _number(row.ratio), row.unit]


TABLE_HEADER = ["section", "figure", "value", "baseline", "baseline value", "ratio", "unit"]


def format_table(rows: Sequence[BenchRow]) -> str:
    """Fixed-width text table for the terminal."""
    cells = [TABLE_HEADER] + [table_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[BenchRow]) -> str:
    def escape(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(escape(cell) for cell in table_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def bench_schema():
    import pyarrow as pa

    return pa.schema([("section", pa.string()), ("figure", pa.string()), ("value", pa.float64()),
                      ("baseline", pa.string()), ("baseline_value", pa.float64()), ("ratio", pa.float64()),
                      ("unit", pa.string()), ("machine", pa.string())])


def write_outputs(rows: Sequence[BenchRow], out_dir: Path, notes: Sequence[str]) -> tuple[Path, Path]:
    """bench.parquet (one row per figure) and bench.md (the table plus how each figure was measured)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    parquet, markdown = out_dir / "bench.parquet", out_dir / "bench.md"
    schema = bench_schema()
    table = pa.table({name: [getattr(row, name) for row in rows] for name in schema.names}, schema=schema)
    pq.write_table(table, parquet)
    machine = rows[0].machine if rows else machine_description()
    text = [f"# make bench — {machine}", "", markdown_table(rows), "", "## How each figure is measured", ""]
    text += [f"- {note}" for note in notes]
    markdown.write_text("\n".join(text) + "\n")
    return parquet, markdown


# ---------------------------------------------------------------- pure figures
def training_flops_per_token(trainable_parameters: int, num_layers: int, hidden_size: int, seq_len: float) -> float:
    """FLOPs to train on one token: 6·N (forward 2·N, backward 4·N multiply-adds over the trainable
    weights) + 12·L·H·T (attention scores and weighted values, forward and backward, over a context of
    T tokens; Chinchilla/PaLM's accounting without the causal halving)."""
    if trainable_parameters < 0 or num_layers < 0 or hidden_size < 0 or seq_len < 0:
        raise ValueError("FLOP counts need non-negative sizes")
    return 6.0 * trainable_parameters + 12.0 * num_layers * hidden_size * seq_len


@dataclass(frozen=True)
class EpochCost:
    epoch: int
    tokens: int
    train_seconds: float  # this epoch's steps only
    eval_seconds: float
    steps: int = 0  # optimizer steps this epoch


def epoch_costs(reports: Sequence[dict[str, Any]]) -> list[EpochCost]:
    """Per-epoch costs from the worker's reports (``train_seconds`` there is cumulative)."""
    costs, previous, previous_step = [], 0.0, 0
    for report in sorted(reports, key=lambda r: r["epoch"]):
        cumulative, step = float(report["train_seconds"]), int(report.get("step") or 0)
        costs.append(EpochCost(int(report["epoch"]), int(report.get("epoch_tokens") or 0),
                               cumulative - previous, float(report.get("eval_seconds") or 0.0), step - previous_step))
        previous, previous_step = cumulative, step
    return costs


def steady(costs: Sequence[EpochCost]) -> list[EpochCost]:
    """Epochs after the first (warm-up: allocator, first optimizer step), or the only one there is."""
    return list(costs[1:]) if len(costs) > 1 else list(costs)


def steady_tokens_per_second(costs: Sequence[EpochCost]) -> float:
    rates = [c.tokens / c.train_seconds for c in steady(costs) if c.train_seconds > 0]
    if not rates:
        raise ValueError("no epoch with measured training time")
    return statistics.median(rates)


def search_cost(rows: Sequence[dict[str, Any]], utility_weight: float) -> tuple[float, float | None, int]:
    """(worker-seconds, best score, trials) of a sweep's evals rows (reference rows excluded).

    A trial's ``train_seconds`` is cumulative over its epochs and ``eval_seconds`` is per evaluation,
    so a trial costs (its last train_seconds + the sum of its eval_seconds) × num_workers.
    """
    from orchestrator.worker import score

    by_trial: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        if row.get("method") in ("target", "retain"):
            continue
        by_trial.setdefault(row["trial_id"], {})[int(row["epoch"])] = row
    worker_seconds, best = 0.0, None
    for epochs in by_trial.values():
        train = max(float(r.get("train_seconds") or 0.0) for r in epochs.values())
        evaluation = sum(float(r.get("eval_seconds") or 0.0) for r in epochs.values())
        workers = max(int(r.get("num_workers") or 1) for r in epochs.values())
        worker_seconds += (train + evaluation) * workers
        for r in epochs.values():
            value = score(r, utility_weight)
            if value is not None and (best is None or value > best):
                best = value
    return worker_seconds, best, len(by_trial)


def median_seconds(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls, and the last call's result."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"{torch.cuda.device_count()}× {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 - a broken CUDA install still gets a table
        pass
    return f"{cpu}, {os.cpu_count()} cores, {gpu}"


def matmul_peak_flops(n: int, repeats: int = 5, dtype: Any = None, device: Any = "cpu") -> float:
    """FLOP/s of n×n @ n×n torch matmuls (2n³ FLOPs each) in ``dtype`` (default fp32) on ``device`` at the
    current thread count, median of ``repeats`` timings. On CUDA each timing is 10 matmuls closed by a
    synchronize (kernels launch asynchronously)."""
    import torch

    device, dtype = torch.device(device), dtype or torch.float32
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    inner = 10 if device.type == "cuda" else 1

    def run() -> None:
        for _ in range(inner):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()  # warm-up: allocation and kernel selection (cuBLAS autotuning)
    seconds, _ = median_seconds(run, repeats)
    return inner * 2.0 * n ** 3 / seconds


# ---------------------------------------------------------------- processes without Ray
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeakMemory:
    """Max resident set size of this process: sampled every few ms in a thread, and the kernel's
    high-water mark (getrusage), whichever is larger."""

    def __init__(self, interval: float | None = 0.005) -> None:
        import psutil

        self._process, self._interval = psutil.Process(), interval
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        # No sampler thread (interval None) where its few % of a core would tax a timed run.
        self._thread = threading.Thread(target=self._sample, daemon=True) if interval else None

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def current(self) -> int:
        return self._process.memory_info().rss

    def __enter__(self) -> "PeakMemory":
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        import resource

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss,
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB


def _worker_process(rank: int, world_size: int, port: int, tasks: list[dict[str, Any]], log_path: str,
                    sample_memory: bool, results) -> None:
    """A plain torch.distributed worker (gloo): runs the tasks through run_worker, reports back."""
    with open(log_path, "a") as log:  # DeepSpeed and the worker print a lot; keep it out of the table
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        import torch
        import torch.distributed as dist

        torch.set_num_threads(THREADS)
        with PeakMemory(interval=0.005 if sample_memory else None) as memory:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
            entered = time.time()
            from orchestrator.worker import WorkerContext, run_worker

            if sample_memory:  # growth then counts what the loop builds, not the libraries it imports
                import deepspeed  # noqa: F401
                import transformers  # noqa: F401

                import orchestrator.data  # noqa: F401
                import orchestrator.models  # noqa: F401
            entry_rss = memory.current()

            reports: list[dict[str, Any]] = []
            context = WorkerContext(rank, world_size, torch.device("cpu"), lambda m, _dir: reports.append(m),
                                    local_rank=rank)
            for task in tasks:
                run_worker(task, context)
            dist.barrier()
            dist.destroy_process_group()
        results.put({"rank": rank, "entered": entered, "reports": reports, "entry_rss": entry_rss,
                     "peak_rss": memory.peak})
    except BaseException:  # noqa: BLE001 - the parent shows it with the log
        results.put({"rank": rank, "error": traceback.format_exc()})


@dataclass
class ProcessRun:
    launched: float  # time.time() before the first process started
    finished: float
    ranks: list[dict[str, Any]]  # per rank: entered, reports, entry_rss, peak_rss


def run_processes(tasks: list[dict[str, Any]], world_size: int, log_path: Path, sample_memory: bool = False,
                  timeout: float = 900) -> ProcessRun:
    """Run ``tasks`` in ``world_size`` spawned gloo processes (a fresh interpreter each, as torchrun)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    launched = time.time()
    processes = [context.Process(target=_worker_process, args=(rank, world_size, port, tasks, str(log_path), sample_memory, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    ranks, deadline = [], launched + timeout
    while len(ranks) < world_size:
        try:
            ranks.append(results.get(timeout=5))
        except Exception:  # noqa: BLE001 - queue.Empty: check that nobody died silently
            if time.time() > deadline or any(p.exitcode not in (None, 0) for p in processes):
                break
    for process in processes:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
    finished = time.time()
    errors = [r["error"] for r in ranks if "error" in r]
    if errors or len(ranks) < world_size:
        tail = log_path.read_text()[-3000:] if log_path.exists() else ""
        raise RuntimeError(f"worker processes failed (log {log_path}):\n{errors[0] if errors else tail}")
    return ProcessRun(launched, finished, sorted(ranks, key=lambda r: r["rank"]))


def local_fit(log_dir: Path) -> Callable[[list[list[dict[str, Any]]], int, float], None]:
    """prepare's ``run_fit`` without Ray: each gang one plain process (world size 1; sharded evaluation
    gives the same numbers on one worker), the gangs side by side."""
    from concurrent.futures import ThreadPoolExecutor

    def fit(gangs: list[list[dict[str, Any]]], num_workers: int, cpus: float) -> None:
        with ThreadPoolExecutor(max_workers=len(gangs)) as pool:
            futures = [pool.submit(run_processes, tasks, 1, log_dir / f"prepare-{i}.log")
                       for i, tasks in enumerate(gangs)]
            for future in futures:
                future.result()

    return fit


# ---------------------------------------------------------------- Ray
def timed_train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` unchanged, after noting when the gang reached it (for gang start)."""
    import ray.train

    from orchestrator.worker import train_loop_per_worker

    if ray.train.get_context().get_world_rank() == 0:
        Path(config["bench_marker"]).write_text(repr(time.time()))
    train_loop_per_worker(config)


def ray_trial(config: dict[str, Any], storage: Path, name: str) -> ProcessRun:
    """The worker loop as a 1-worker TorchTrainer; reports come from the checkpoints it registered."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    marker = storage / f"{name}.entered"
    cpus = config["scaling"]["cpus_per_worker"]
    trainer = TorchTrainer(
        timed_train_loop, train_loop_config=dict(config, bench_marker=str(marker)),
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=name, storage_path=str(storage)),
    )
    launched = time.time()
    result = trainer.fit()
    finished = time.time()
    reports = [metrics for _, metrics in (result.best_checkpoints or [])]
    return ProcessRun(launched, finished, [{"rank": 0, "entered": float(marker.read_text()), "reports": reports}])


def start_ray(temp_dir: Path) -> None:
    """A local cluster as the product starts one (its env defaults, the dashboard on, every process knowing
    its address: see ``api.start_local_ray``), quiet on stdout."""
    import ray

    from orchestrator.api import RAY_ENV_DEFAULTS, start_local_ray

    if ray.is_initialized():
        return
    for name, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    start_local_ray(os.cpu_count(), _temp_dir=str(temp_dir), log_to_driver=False)


# ---------------------------------------------------------------- the measurements
@dataclass
class Bench:
    """What every section shares: the spec, the prepared models, a scratch directory, a logger."""

    size: BenchSize
    spec: Any  # JobSpec
    prepared: Any  # prepare.Prepared
    work: Path
    log: Callable[[str], None]

    def base_config(self) -> dict[str, Any]:
        from orchestrator.api import base_trial_config

        return base_trial_config(self.spec, self.work / "run", "bench", self.prepared)

    def trial_config(self, method: str, params: dict[str, Any], name: str, **training: Any) -> dict[str, Any]:
        base = self.base_config()
        return dict(base, mode="unlearn", method=method, params=params, trial_id=name, trial_params=params,
                    run_dir=str(self.work / name), training={**base["training"], **training})


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


def measure_evaluation(bench: Bench) -> list[BenchRow]:
    """P4: the batched, sharding-ready suite vs the one-at-a-time reference, same model and data."""
    import torch

    from orchestrator.data import load_benchmark
    from orchestrator.evaluation.scorer import ModelScorer
    from orchestrator.evaluation.suite import ReferenceStats, evaluate, evaluate_per_sample
    from orchestrator.models import load_model, load_tokenizer
    from orchestrator.results import METRIC_COLUMNS
    from orchestrator.worker import eval_config

    base = bench.base_config()
    torch.set_num_threads(THREADS)
    model = load_model(bench.prepared.model_path).eval()
    tokenizer = load_tokenizer(bench.prepared.tokenizer_path)
    data = load_benchmark(base["benchmark"]["source"], **base["benchmark"]["generator"])
    b = base["benchmark"]
    arguments = dict(forget_split=b["forget_split"], retain_split=b["retain_split"], holdout_split=b["holdout_split"],
                     retain_reference=ReferenceStats.from_json(Path(bench.prepared.retain_stats).read_text()),
                     target_model_utility=bench.prepared.target_model_utility)
    scorer, config = ModelScorer(model), eval_config(base)
    with torch.no_grad():
        bench.log(f"P4: evaluate (batched) × {bench.size.eval_repeats}")
        batched_seconds, batched = median_seconds(lambda: evaluate(scorer, tokenizer, data, config, **arguments),
                                                  bench.size.eval_repeats)
        bench.log(f"P4: evaluate_per_sample × {bench.size.per_sample_repeats}")
        single_seconds, single = median_seconds(lambda: evaluate_per_sample(scorer, tokenizer, data, config, **arguments),
                                                bench.size.per_sample_repeats)
    compared = [m for m in METRIC_COLUMNS if batched.metrics.get(m) is not None and single.metrics.get(m) is not None]
    missing = [m for m in METRIC_COLUMNS if (batched.metrics.get(m) is None) != (single.metrics.get(m) is None)]
    difference = max((abs(batched.metrics[m] - single.metrics[m]) for m in compared), default=0.0)
    agree = "agree" if difference <= 1e-4 and not missing else "DISAGREE"
    return [
        measured("P4 evaluation", "full suite seconds, evaluate (batched)", batched_seconds, "s",
                 "evaluate_per_sample", single_seconds),
        measured("P4 evaluation", f"aggregates {agree}: max |Δ| over {len(compared)} metrics"
                 + (f", {len(missing)} computed by one side only" if missing else ""), difference, "abs. difference"),
    ]


def measure_search(bench: Bench) -> list[BenchRow]:
    """P5: the full grid vs ASHA (same grid) vs Optuna (half as many trials) on one GA lr space."""
    grid = list(bench.size.lr_grid)
    methods = [{"name": "ga", "space": {"lr": {"grid": grid}}}]
    g_seconds, g_best, g_trials, g_wall = run_sweep(bench, "grid", {"methods": methods})
    rows = []
    searches = [("asha", "ASHA", {"methods": methods, "scheduler": "asha", "grace_period": 1, "reduction_factor": 2})]
    if bench.size.optuna:
        searches.append(("optuna", "Optuna", {"methods": methods, "search": "optuna",
                                              "num_samples": max(1, math.ceil(len(grid) / 2))}))
    for name, label, sweep in searches:
        try:
            seconds, best, trials, wall = run_sweep(bench, name, sweep)
        except Exception as error:  # noqa: BLE001 - one search failing leaves the other's rows
            reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
            bench.log(f"P5: {name}: FAILED: {reason}")
            rows.append(measured("P5 search", f"{label}: FAILED: {reason}", None, ""))
            continue
        rows += [
            measured("P5 search", f"best score, {label} ({trials} trials; score = log10 FQ − 10·max(0, utility loss))",
                     best, "score", f"grid ({g_trials} trials)", g_best, comparable=False),
            measured("P5 search", f"worker-seconds (train + eval) × workers, {label}", seconds, "worker·s", "grid", g_seconds),
            measured("P5 search", f"sweep wall time, {label}", wall, "s", "grid", g_wall),
        ]
    return rows


def run_sweep(bench: Bench, name: str, sweep: dict[str, Any]) -> tuple[float, float | None, int, float]:
    """One real sweep through ``api.run`` (prepare is cached): worker-seconds, best score, trials, wall s."""
    from orchestrator.api import run
    from orchestrator.spec import parse_spec

    spec = parse_spec(bench_spec(bench.size, bench.spec.prepare.cache_dir, **sweep), f"<bench {name}>")
    bench.log(f"P5: {name} sweep over GA lr {list(bench.size.lr_grid)} ({spec.training.epochs} epochs per trial; "
              f"Tune's output in {bench.work / f'p5-{name}.log'})")
    start_ray(bench.work / "ray")
    outcome: dict[str, Any] = {}

    def sweep_thread() -> None:
        try:
            with open(bench.work / f"p5-{name}.log", "a") as out, contextlib.redirect_stdout(out):
                outcome["result"] = run(spec, run_dir=bench.work / f"p5-{name}", log=lambda line: None)
        except BaseException as error:  # noqa: BLE001 - handed to the caller below
            outcome["error"] = error

    start = time.perf_counter()
    thread = threading.Thread(target=sweep_thread, daemon=True)
    thread.start()
    thread.join(bench.size.sweep_timeout)
    wall = time.perf_counter() - start
    if thread.is_alive():  # a hung sweep: take Ray down under it, so the bench still finishes
        import ray

        ray.shutdown()
        thread.join(60)
        raise TimeoutError(f"{name} sweep still running after {bench.size.sweep_timeout:.0f} s; Ray shut down")
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    worker_seconds, best, trials = search_cost(result.evals.to_pylist(), spec.sweep.utility_weight)
    bench.log(f"P5: {name}: {trials} trials, best score {best}, {worker_seconds:.1f} worker-s, {wall:.0f} s wall")
    return worker_seconds, best, trials, wall


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


NOTES = [
    "P1: both sides run `train_loop_per_worker`'s loop (`run_worker`) on the same config (GA, batch 4, the 80-row "
    "`full` split as forget set, ZeRO-2, 1 thread). tokens/s = median over epochs 2..E of EpochStats tokens / "
    "seconds, read from the worker's reports (train_seconds, epoch_tokens). Gang start = launch (fit() / "
    "Process.start()) → the loop is entered with its process group up.",
    "P2: wall seconds per epoch from the worker's reports (train_seconds differences; eval_seconds), median over "
    "epochs after the first; NPO with alpha = 1 (NPO+GD), ULD with a quarter-depth LoRA-16 assistant.",
    "P3: FLOP/token = 6·N + 12·L·H·T (N trainable parameters, L layers, H hidden size, T mean training "
    "sequence length); achieved = FLOP/token × P1's plain tokens/s; peak = 2n³ / median time of an fp32 n×n "
    "torch matmul at the same thread count, timed in the same run.",
    "P4: median wall time of the whole suite (teacher-forced metrics, generation, MIAs) per path; Δ = max "
    "absolute difference of the aggregate metrics.",
    "P5: real Ray Tune sweeps through `orchestrator.api.run` (one-worker trials, two at a time, cached prepare; "
    "ASHA: grace 1 epoch, reduction factor 2, on the same grid); worker-seconds = Σ over trials of (last "
    "cumulative train_seconds + Σ eval_seconds) × num_workers from the evals table; score = log10(FQ) − "
    "10·max(0, utility loss); Optuna (TPE) samples half as many trials as the grid has.",
    "P6: 2 gloo processes fine-tune the wider model for one epoch through `run_worker` (finetune mode, the "
    "stage set in its config); peak RSS = max(psutil RSS sampled every 5 ms, getrusage ru_maxrss) per worker "
    "process, max over the two workers; growth = peak − RSS after torch, DeepSpeed and transformers are imported.",
]


# ---------------------------------------------------------------- main
def guarded(section: str, measure: Callable[[], list[BenchRow]], log: Callable[[str], None]) -> list[BenchRow]:
    """A section that fails becomes one row saying so; the others still run and the table is written."""
    try:
        rows = measure()
    except Exception as error:  # noqa: BLE001 - reported in the table and the log, not swallowed
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        log(f"{section}: FAILED: {reason}")
        return [measured(section, f"FAILED: {reason}", None, "")]
    for row in rows:
        log(f"{row.section}: {row.figure}: {_number(row.value)} {row.unit}"
            + (f" vs {_number(row.baseline_value)} ({row.baseline}), ratio {_number(row.ratio)}" if row.baseline else ""))
    return rows


def run_bench(size: BenchSize, log: Callable[[str], None]) -> list[BenchRow]:
    import torch

    from orchestrator.prepare import prepare
    from orchestrator.spec import parse_spec

    torch.set_num_threads(THREADS)
    machine = machine_description()
    log(f"machine: {machine}")
    work = Path(tempfile.mkdtemp(prefix="unlearn-bench-", dir="/tmp"))  # Ray's socket paths must stay short
    cache = str(PROJECT_ROOT / ".cache" / "unlearn")
    spec = parse_spec(bench_spec(size, cache), "<bench>")
    rows: list[BenchRow] = []
    try:
        log("prepare: tokenizer, target and retain models (cached by content hash; plain processes)")
        prepared = prepare(spec, local_fit(work), lambda line: log(line))
        bench = Bench(size, spec, prepared, work, log)
        # Ray-free measurements first; then Ray starts (P1's second half) and the sweeps run on it.
        rows += guarded("P4 evaluation", lambda: measure_evaluation(bench), log)
        rows += guarded("P2 ULD vs NPO", lambda: measure_uld_vs_npo(bench), log)
        rows += guarded("P6 memory", lambda: measure_memory(bench), log)
        log(f"P3: fp32 matmul peak, {size.matmul_size}² at {THREADS} thread (before Ray starts)")
        peak = matmul_peak_flops(size.matmul_size)
        plain_rate: list[float] = []

        def orchestration() -> list[BenchRow]:
            p1_rows, rate = measure_orchestration(bench)
            plain_rate.append(rate)
            return p1_rows

        rows += guarded("P1 orchestration", orchestration, log)
        rows += guarded("P3 utilisation", lambda: measure_utilisation(bench, plain_rate[0], peak), log)
        rows += guarded("P5 search", lambda: measure_search(bench), log)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    order = ["P1", "P2", "P3", "P4", "P5", "P6"]
    rows.sort(key=lambda row: order.index(row.section[:2]))
    return with_machine(rows, machine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: fewer epochs, a smaller P6 model, 2-point sweeps, no Optuna (~6 min on 2 cores)")
    parser.add_argument("--out", default=str(PROJECT_ROOT), help="where bench.parquet and bench.md go")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(PROJECT_ROOT / ".cache" / "torch_extensions"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    start = time.perf_counter()

    def log(line: str) -> None:
        # The real stdout: a sweep redirects sys.stdout (Tune's status tables) to its log file.
        print(f"[bench {time.perf_counter() - start:6.1f}s] {line}", file=sys.__stdout__, flush=True)

    rows = run_bench(QUICK if args.quick else FULL, log)
    parquet, markdown = write_outputs(rows, Path(args.out), NOTES)
    print(format_table(rows))
    log(f"wrote {parquet} and {markdown}")
    return 0


if __name__ == "__main__":
    from orchestrator.bench import main as _main  # by module name, so Ray and spawn pickle by reference

    sys.exit(_main())
