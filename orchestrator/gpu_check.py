"""The GPU path without Ray: NPO and ULD on a random-weight Llama through the real torchrun entry.

    python -m orchestrator.gpu_check --out DIR [--config-size 1b|tiny] [--steps N] [--dtype D] [--offload]
        [--zero-stage 2|3] [--authors N] [--no-generation] [--no-gather-weights] [--model-dir DIR]

Builds a tokenizer and a random-weight Llama (``1b``: hidden 2048, 16 layers, 32 heads, 8 KV heads,
intermediate 8192, vocab 32000; ``tiny``: a CPU-sized one) into DIR, writes one trial config per method
(ZeRO-3 unless --zero-stage 2, one worker, N epochs of exactly one optimizer step each over the embedded forget set, evaluation
after the last epoch only), runs ``torchrun --nproc-per-node 1 -m orchestrator.worker CONFIG.json`` per
method and writes DIR/gpu_check.json and DIR/gpu_check.md: tokens/s, MFU against a bf16 (or the run's
dtype) matmul peak timed on the same device in the same run, and peak memory.

On CUDA the worker takes NCCL, bf16, fused AdamW (without offload) and generates on the GPU during its
evaluation; on CPU the same code path runs with gloo (``DS_ACCELERATOR=cpu``). Ray is never imported.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.measure import (DeviceMemoryPeak, epoch_costs, free_port, machine_description, matmul_peak_flops,
                                  steady_tokens_per_second, training_flops_per_token)
from orchestrator.provenance import PROJECT_ROOT
from orchestrator.zero import fused_adamw

GIB = 1024 ** 3


@dataclass(frozen=True)
class CheckSize:
    """The model and the data of one check size."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int  # the model's; the BPE tokenizer trained on the small benchmark may have fewer tokens
    num_authors: int  # embedded benchmark: forget10 = 10 % of the authors' questions
    questions_per_author: int
    generation: bool  # evaluation greedy-generates (ROUGE, utility) on the device
    max_new_tokens: int
    matmul_size: int  # n of the n×n peak matmul


SIZES = {
    # Llama-3.2-1B's shape with a 32k vocabulary and tied embeddings: 1.04 B parameters. 80 forget rows:
    # one step is 80 forget + 80 retain sequences (NPO), 240 + 240 (ULD), enough tokens to fill the GPU.
    "1b": CheckSize(2048, 16, 32, 8, 8192, 32000, 100, 8, True, 32, 8192),
    # GQA kept (4 query heads, 2 KV heads); small enough for 2 CPU cores, still generating 8 tokens in
    # its evaluation (greedy generation under ZeRO-3 is part of the path checked).
    "tiny": CheckSize(64, 2, 4, 2, 128, 512, 20, 3, True, 8, 512),
}

# Method → (params, lr): NPO+GD as in the bench; ULD with the repo's LoRA-16 assistant at its paper lr.
METHODS: dict[str, tuple[dict[str, Any], float]] = {
    "npo": ({"alpha": 1.0}, 1e-5),
    "uld": ({"lora_rank": 16, "lora_alpha": 16.0}, 1e-3),
}


# ---------------------------------------------------------------- the spec, the model, the trial configs
def check_spec(size: CheckSize, model_dir: Path, cache_dir: Path, steps: int, dtype: str, offload: bool,
               use_gpu: bool, threads: int, zero_stage: int = 3, gather_weights: bool = True):
    """A validated JobSpec for the check (parse_spec fills every default the worker reads)."""
    from orchestrator.spec import parse_spec

    return parse_spec({
        "name": "gpu-check", "seed": 0,
        "benchmark": {"source": "embedded", "num_authors": size.num_authors,
                      "questions_per_author": size.questions_per_author, "forget_split": "forget10",
                      "retain_split": "retain90", "holdout_split": "holdout10"},
        "model": {"target": str(model_dir), "dtype": dtype, "prompt_template": "embedded"},
        "prepare": {"cache_dir": str(cache_dir)},
        "training": {"epochs": steps, "max_length": 128, "warmup_epochs": 0},
        "scaling": {"num_workers": 1, "use_gpu": use_gpu, "zero_stage": zero_stage, "offload": offload,
                    "threads_per_worker": threads},
        "evaluation": {"every": 0, "batch_size": 16, "generation": size.generation,
                       "max_new_tokens": size.max_new_tokens, "verbmem_prefix_tokens": 8,
                       "verbmem_new_tokens": size.max_new_tokens, "knowmem_new_tokens": size.max_new_tokens,
                       "gather_weights": gather_weights},
        "sweep": {"methods": [{"name": name} for name in METHODS]},
    }, "<gpu_check>")


def llama_config(size: CheckSize, tokenizer):
    from transformers import LlamaConfig

    if len(tokenizer) > size.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the model's vocabulary only {size.vocab_size}")
    return LlamaConfig(
        vocab_size=size.vocab_size, hidden_size=size.hidden_size, num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads, num_key_value_heads=size.num_kv_heads,
        intermediate_size=size.intermediate_size, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def build_model_dir(spec, size: CheckSize, directory: Path, dtype: str) -> Path:
    """Tokenizer (BPE on the benchmark's strings) and a seeded random-weight Llama, saved side by side;
    a directory that already holds both (an earlier check of the same size, --model-dir) is reused."""
    from transformers import LlamaForCausalLM

    from orchestrator.data import load_benchmark
    from orchestrator.models import DTYPES
    from orchestrator.prepare import benchmark_config
    from orchestrator.tokenizer import benchmark_texts, train_tokenizer

    if (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file():
        return directory
    bench = benchmark_config(spec)
    data = load_benchmark(bench["source"], **bench["generator"])
    tokenizer = train_tokenizer(benchmark_texts(data, spec.model.prompt_template), min(size.vocab_size, 4096))
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM._from_config(llama_config(size, tokenizer), dtype=DTYPES[dtype])
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def trial_config(spec, model_dir: Path, run_dir: Path, method: str, params: dict[str, Any], lr: float,
                 batch_size: int) -> dict[str, Any]:
    """What a sweep trial gives the worker (api.base_trial_config, one home for its keys), with no retain
    model: forget quality stays empty, every other metric is computed."""
    from orchestrator.api import base_trial_config
    from orchestrator.prepare import Prepared

    prepared = Prepared(str(model_dir), str(model_dir), None, None, [], 0.0)
    base = base_trial_config(spec, run_dir, "gpu-check", prepared)
    return dict(base, job="unlearn", method=method, params=params, trial_id=f"{method}_check",
                trial_params=params, training=dict(base["training"], lr=lr, batch_size=batch_size))


# ---------------------------------------------------------------- what one step trains on, and its FLOPs
def epoch_items(spec, method: str, params: dict[str, Any], tokenizer) -> tuple[int, int, float]:
    """(items in the method's epoch, sequences per item (one per split), mean tokens per trained
    sequence), from the worker's own Dataset."""
    from methods import build_method
    from orchestrator.data import load_benchmark
    from orchestrator.data.training import UnlearningDataset
    from orchestrator.prepare import benchmark_config

    bench = benchmark_config(spec)
    data = load_benchmark(bench["source"], **bench["generator"])
    splits = build_method(method, **params).splits
    dataset = UnlearningDataset({"forget": data[bench["forget_split"]], "retain": data[bench["retain_split"]]},
                                splits, tokenizer, spec.model.prompt_template, spec.training.max_length, spec.seed)
    lengths = [len(dataset[i][split].input_ids) for i in range(len(dataset)) for split in splits]
    return len(dataset), len(splits), sum(lengths) / len(lengths)


def trained_module_shape(config, method: str, params: dict[str, Any]) -> dict[str, int]:
    """Trainable and frozen parameters and depth of what the worker trains (ULD: the LoRA assistant),
    built on the meta device through the worker's own builders (no memory, no init time)."""
    from transformers import LlamaForCausalLM

    from methods import build_method
    from orchestrator.steps import trainable_parameters

    built = build_method(method, **params)
    with torch.device("meta"):
        module = LlamaForCausalLM(config)
        if built.trains == "assistant":
            from orchestrator.uld import assistant_layer_count, build_assistant

            p = built.params
            layers = assistant_layer_count(config.num_hidden_layers, p.assistant_layers)
            module = build_assistant(module, layers, p.lora_rank, p.lora_alpha, p.lora_dropout)
    trainable = sum(p.numel() for p in trainable_parameters(module, built))
    total = sum(p.numel() for p in module.parameters())
    layers = module.config.num_hidden_layers
    return {"trainable": trainable, "frozen": total - trainable, "layers": layers, "hidden": config.hidden_size}


def flops_per_trained_token(shape: dict[str, int], seq_len: float) -> float:
    """measure.training_flops_per_token (6·N + 12·L·H·T) over the trainable weights, plus 4 FLOPs per frozen
    weight a token passes through (forward 2, input gradient 2; no weight gradient): ULD's assistant is
    mostly frozen, and counting only its LoRA weights would report ~0 % of the work it does."""
    return training_flops_per_token(shape["trainable"], shape["layers"], shape["hidden"], seq_len) + 4.0 * shape["frozen"]


def model_flops_utilisation(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    if peak_flops <= 0 or not math.isfinite(peak_flops):
        raise ValueError(f"peak FLOP/s must be positive and finite, got {peak_flops}")
    return tokens_per_second * flops_per_token / peak_flops


# ---------------------------------------------------------------- running the worker under torchrun
@dataclass
class TorchrunResult:
    returncode: int
    reports: list[dict[str, Any]]  # rank 0's per-epoch metrics, as the worker printed them
    host_peak_rss: int  # bytes: ru_maxrss of torchrun and its worker (the largest of the tree)
    seconds: float


def parse_reports(text: str) -> list[dict[str, Any]]:
    """The JSON lines ``worker.main`` prints per epoch, out of everything else on the log."""
    reports = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and "epoch" in value:
            reports.append(value)
    return reports


def worker_env(use_gpu: bool, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(PROJECT_ROOT / ".cache" / "torch_extensions"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def torchrun_command(config_path: Path) -> list[str]:
    """``torchrun --nproc-per-node 1 -m orchestrator.worker CONFIG`` (torchrun is torch.distributed.run's
    console script; by module so it is this interpreter's), on a free port beside other runs."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "orchestrator.worker", str(config_path)]


def run_torchrun(config_path: Path, log_path: Path, env: dict[str, str], timeout: float) -> TorchrunResult:
    """One torchrun to completion; wait4 gives this child's own rusage (its waited-for worker included),
    so each method's peak RSS is its own even when several run one after another."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(torchrun_command(config_path), stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=PROJECT_ROOT, start_new_session=True)
    timer = threading.Timer(timeout, lambda: os.killpg(process.pid, signal.SIGKILL))  # torchrun and its worker
    timer.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        timer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    return TorchrunResult(process.returncode, parse_reports(log_path.read_text(errors="replace")),
                          usage.ru_maxrss * 1024, time.perf_counter() - start)  # Linux: ru_maxrss in KiB


# ---------------------------------------------------------------- one method, the whole check
def check_method(method: str, spec, model_dir: Path, out: Path, peak_flops: float, device: torch.device,
                 timeout: float) -> dict[str, Any]:
    from transformers import AutoConfig

    from orchestrator.models import load_tokenizer

    params, lr = METHODS[method]
    items, splits, seq_len = epoch_items(spec, method, params, load_tokenizer(str(model_dir)))
    # batch = the whole epoch: every epoch is exactly one optimizer step, so --steps N is N steps.
    config = trial_config(spec, model_dir, out / "runs" / method, method, params, lr, items)
    config_path = out / "configs" / f"{method}.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config, indent=1))
    log_path = out / "logs" / f"{method}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = worker_env(device.type == "cuda", spec.scaling.threads_per_worker)
    if device.type == "cuda":
        with DeviceMemoryPeak(device) as sampled:
            run = run_torchrun(config_path, log_path, env, timeout)
    else:
        sampled = None
        run = run_torchrun(config_path, log_path, env, timeout)
    shape = trained_module_shape(AutoConfig.from_pretrained(model_dir), method, params)
    per_token = flops_per_trained_token(shape, seq_len)
    result: dict[str, Any] = {
        "method": method, "params": params, "lr": lr, "returncode": run.returncode, "wall_seconds": run.seconds,
        "sequences_per_step": items * splits,
        "mean_sequence_tokens": seq_len, "trainable_parameters": shape["trainable"],
        "frozen_parameters": shape["frozen"], "flops_per_token": per_token, "host_peak_rss_bytes": run.host_peak_rss,
        "log": str(log_path), "config": str(config_path),
    }
    result.update(throughput(run.reports, per_token, peak_flops))
    result.update(peak_memory(device, run, sampled))
    return result


def throughput(reports: list[dict[str, Any]], flops_per_token: float, peak_flops: float) -> dict[str, Any]:
    """tokens/s over the epochs after the first (bench's steady rate), achieved FLOP/s, MFU."""
    if not reports:
        return {"status": "no report", "tokens_per_second": None, "achieved_flops": None, "mfu": None}
    last = reports[-1]
    try:
        rate = steady_tokens_per_second(epoch_costs(reports))
    except ValueError:  # no epoch with measured time
        rate = None
    achieved = rate * flops_per_token if rate is not None else None
    return {"status": last.get("status"), "epochs": last.get("epoch"), "steps": last.get("step"),
            "tokens_per_second": rate, "achieved_flops": achieved,
            "mfu": model_flops_utilisation(rate, flops_per_token, peak_flops) if rate is not None else None,
            "train_seconds": last.get("train_seconds"), "eval_seconds": last.get("eval_seconds"),
            # ROUGE exists only when the final evaluation greedy-generated (on the worker's device).
            "generated": last.get("forget_rouge") is not None}


def peak_memory(device: torch.device, run: TorchrunResult, sampled: DeviceMemoryPeak | None) -> dict[str, Any]:
    reported = [r["peak_memory_bytes"] for r in run.reports if isinstance(r.get("peak_memory_bytes"), (int, float))]
    if device.type == "cuda" and reported:
        return {"peak_memory_bytes": max(reported), "peak_memory_source": "torch.cuda.max_memory_allocated (worker)"}
    if device.type == "cuda" and sampled is not None:
        return {"peak_memory_bytes": sampled.peak,
                "peak_memory_source": "device memory in use while the worker ran − before (cudaMemGetInfo, 50 ms)"}
    return {"peak_memory_bytes": run.host_peak_rss, "peak_memory_source": "ru_maxrss of the torchrun tree"}


def run_check(out: Path, size_name: str, steps: int, dtype: str | None, offload: bool,
              timeout: float = 600, zero_stage: int = 3, authors: int | None = None, generation: bool = True,
              model_dir: Path | None = None, gather_weights: bool = True) -> dict[str, Any]:
    """Build (or reuse ``model_dir``), run NPO and ULD, write gpu_check.json and gpu_check.md; returns the
    summary. ``authors`` scales the embedded benchmark, hence the tokens of each (whole-epoch) step."""
    from orchestrator.models import DTYPES

    if size_name not in SIZES:
        raise ValueError(f"--config-size: expected one of {', '.join(SIZES)}, got {size_name!r}")
    if steps < 1:
        raise ValueError(f"--steps must be ≥ 1, got {steps}")
    if authors is not None and authors < 10:
        raise ValueError(f"--authors must be ≥ 10 (forget10 takes a tenth of them), got {authors}")
    use_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    dtype = dtype or "bfloat16"
    size = dataclasses.replace(SIZES[size_name], num_authors=authors or SIZES[size_name].num_authors,
                               generation=generation and SIZES[size_name].generation)
    threads = 1 if not use_gpu else 4
    out = out.resolve()
    model_dir = (model_dir or out / "model").resolve()
    spec = check_spec(size, model_dir, out / "cache", steps, dtype, offload, use_gpu, threads, zero_stage,
                      gather_weights)
    build_model_dir(spec, size, model_dir, dtype)
    torch.set_num_threads(threads)  # the peak at the worker's thread count
    peak = matmul_peak_flops(size.matmul_size, dtype=DTYPES[dtype], device=device)
    if use_gpu:
        torch.cuda.empty_cache()
    summary: dict[str, Any] = {
        "machine": machine_description(), "device": str(device), "dtype": dtype, "zero_stage": zero_stage,
        "offload": offload, "authors": size.num_authors, "generation": size.generation,
        "gather_weights": gather_weights,
        "backend": "nccl" if use_gpu else "gloo", "fused_adamw": fused_adamw(offload), "world_size": 1,
        "config_size": size_name, "steps": steps, "threads_per_worker": threads,
        "matmul_peak_flops": peak, "matmul_peak": f"{size.matmul_size}² {dtype} torch.mm on {device}",
        "methods": {method: check_method(method, spec, model_dir, out, peak, device, timeout)
                    for method in METHODS},
    }
    write_summary(out, summary)
    return summary


def write_summary(out: Path, summary: dict[str, Any]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "gpu_check.json", out / "gpu_check.md"
    json_path.write_text(json.dumps(summary, indent=1))
    md_path.write_text(summary_markdown(summary))
    return json_path, md_path


def _figure(value: Any, scale: float = 1.0, digits: int = 4) -> str:
    return "–" if value is None else f"{value / scale:.{digits}g}"


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# GPU-path check — {summary['machine']}", "",
        f"torchrun, world size 1, {summary['backend']}, ZeRO-{summary['zero_stage']}"
        f"{' + CPU offload' if summary['offload'] else ''}, {summary['dtype']}, fused AdamW "
        f"{'on' if summary['fused_adamw'] else 'off'}, {summary['config_size']} model, {summary['steps']} steps per method, "
        f"embedded benchmark of {summary['authors']} authors, evaluation "
        f"{'with' if summary['generation'] else 'without'} generation"
        f"{', weights gathered once' if summary['gather_weights'] and summary['zero_stage'] == 3 else ''}; "
        f"peak {_figure(summary['matmul_peak_flops'], 1e12)} TFLOP/s ({summary['matmul_peak']}).", "",
        "| method | exit | status | tokens/s | FLOP/token | achieved TFLOP/s | MFU | peak memory (GiB) | memory measured as "
        "| evaluation generated | evaluation s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in summary["methods"].values():
        lines.append(f"| {m['method']} | {m['returncode']} | {m.get('status')} | {_figure(m.get('tokens_per_second'))} | "
                     f"{_figure(m['flops_per_token'])} | {_figure(m.get('achieved_flops'), 1e12)} | "
                     f"{_figure(m.get('mfu'), 0.01, 3)} % | {_figure(m.get('peak_memory_bytes'), GIB)} | "
                     f"{m.get('peak_memory_source')} | {'yes' if m.get('generated') else 'no'} | {_figure(m.get('eval_seconds'), 1.0, 3)} |")
    lines += ["", "tokens/s: median over epochs after the first of the worker's epoch tokens / train seconds "
              "(one optimizer step per epoch). FLOP/token: 6·N_trainable + 12·L·H·T + 4·N_frozen of the trained "
              "module (NPO: the model; ULD: the LoRA assistant), excluding NPO's reference forward. "
              "MFU = tokens/s × FLOP/token / matmul peak."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the model, configs, logs and the summary")
    parser.add_argument("--config-size", default="1b", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (= epochs) per method; the first is warm-up")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default bfloat16")
    parser.add_argument("--offload", action="store_true", help="ZeRO-3 parameter and optimizer offload to CPU")
    parser.add_argument("--zero-stage", type=int, choices=[2, 3], default=3)
    parser.add_argument("--authors", type=int, default=None,
                        help="embedded benchmark size (default: the config size's); a step trains on a tenth of them")
    parser.add_argument("--no-generation", action="store_true", help="evaluate teacher-forced metrics only")
    parser.add_argument("--no-gather-weights", action="store_true",
                        help="evaluate with ZeRO-3's per-layer gathers (evaluation.gather_weights: false)")
    parser.add_argument("--model-dir", default=None, help="where the random-weight model is built, or reused from")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per torchrun")
    args = parser.parse_args(argv)
    summary = run_check(Path(args.out), args.config_size, args.steps, args.dtype, args.offload, args.timeout,
                        args.zero_stage, args.authors, not args.no_generation,
                        Path(args.model_dir) if args.model_dir else None, not args.no_gather_weights)
    print(summary_markdown(summary))
    return 0 if all(m["returncode"] == 0 for m in summary["methods"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
