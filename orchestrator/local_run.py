"""The worker loop without Ray: each gang a set of spawned plain processes (gloo), as torchrun would start
them. ``unlearn eval`` scores models this way when no cluster is asked for, and the bench measures the loop
beside its Ray Train twin."""
from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from orchestrator.measure import PeakMemory, free_port

THREADS = 1  # intra-op threads per process: the product's default (scaling.threads_per_worker)


def _worker_process(rank: int, world_size: int, port: int, tasks: list[dict[str, Any]], log_path: str,
                    sample_memory: bool, results) -> None:
    """A plain torch.distributed worker (gloo): runs the tasks through run_job, reports back."""
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
            from orchestrator.worker import WorkerContext, run_job

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
                run_job(task, context)
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
        log_dir.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=len(gangs)) as pool:
            futures = [pool.submit(run_processes, tasks, 1, log_dir / f"prepare-{i}.log")
                       for i, tasks in enumerate(gangs)]
            for future in futures:
                future.result()

    return fit
