"""Measurement helpers shared by ``make bench`` and the GPU check: FLOPs per token, per-epoch costs from
the worker's reports, medians of repeated timings, the matmul peak, peak resident memory, the machine."""
from __future__ import annotations

import os
import platform
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence


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


class DeviceMemoryPeak:
    """Peak device memory in use on one GPU while a child runs, above what was in use before it started:
    cudaMemGetInfo is device-wide, so it sees the worker's CUDA context and allocator pool (an upper
    bound on its max_memory_allocated). Used when the worker does not report its own peak."""

    def __init__(self, device: Any, interval: float = 0.05) -> None:
        self.device, self.interval, self.peak = device, interval, 0
        self._idle = self._used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._used() - self._idle)

    def __enter__(self) -> "DeviceMemoryPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
