"""The GPU path's decisions, checked without a GPU: the DeepSpeed config for bf16 + ZeRO-3 (+ offload),
when AdamW is fused (everywhere but under offload), the trial config and FLOP accounting of ``orchestrator.gpu_check``, and (integration)
the check itself on CPU through the real torchrun entry with ZeRO-3 for NPO and ULD.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator import gpu_check
from orchestrator.zero import deepspeed_config
from tests.conftest import deepspeed_reads


# ---------------------------------------------------------------- DeepSpeed config
def test_bf16_zero3_offload_config_as_deepspeed_reads_it(monkeypatch):
    # DeepSpeed's own parser, as rank 0 of 3: batch 4 × accumulation 2 × 3 workers = 24; parameters and
    # optimizer offloaded to the CPU with a torch optimizer (no DeepSpeed CPU Adam); bf16, not fp16; clip 1.
    parsed = deepspeed_reads(deepspeed_config(3, 4, 2, 3, "bfloat16", True, 1.0), 3, monkeypatch)
    assert parsed.train_batch_size == 24 and parsed.train_micro_batch_size_per_gpu == 4
    assert parsed.gradient_accumulation_steps == 2
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled
    assert parsed.zero_optimization_stage == 3 and parsed.zero_config.gather_16bit_weights_on_model_save
    assert parsed.zero_config.offload_param.device == "cpu"
    assert parsed.zero_config.offload_optimizer.device == "cpu"
    assert not parsed.zero_force_ds_cpu_optimizer and parsed.zero_allow_untested_optimizer
    assert parsed.gradient_clipping == 1.0


def test_bf16_zero3_without_offload_keeps_parameters_and_optimizer_on_the_device(monkeypatch):
    parsed = deepspeed_reads(deepspeed_config(3, 8, 1, 2, "bfloat16", False, 1.0), 2, monkeypatch)
    assert parsed.zero_optimization_stage == 3 and parsed.train_batch_size == 16
    assert parsed.zero_config.offload_param is None and parsed.zero_config.offload_optimizer is None
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled


def test_max_grad_norm_0_turns_deepspeed_clipping_off(monkeypatch):
    parsed = deepspeed_reads(deepspeed_config(2, 8, 1, 1, "float32", False, 0.0), 1, monkeypatch)
    assert parsed.gradient_clipping == 0.0


def test_float16_and_float32_map_to_deepspeeds_precision_modes(monkeypatch):
    fp16 = deepspeed_reads(deepspeed_config(2, 2, 1, 1, "float16", False, 1.0), 1, monkeypatch)
    assert fp16.float16_config.enabled and not fp16.bfloat16_config.enabled
    fp32 = deepspeed_reads(deepspeed_config(0, 2, 1, 1, "float32", False, 1.0), 1, monkeypatch)
    assert not fp32.float16_config.enabled and not fp32.bfloat16_config.enabled


# ---------------------------------------------------------------- fused AdamW
class _OptimizerBuilt(Exception):
    """Raised by the recording AdamW: the worker stops right after choosing its optimizer."""


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    """A tiny random-weight model + tokenizer as gpu_check builds them, and its spec."""
    out = tmp_path_factory.mktemp("gpu-check")
    size = gpu_check.SIZES["tiny"]
    spec = gpu_check.check_spec(size, out / "model", out / "cache", 1, "float32", False, False, 1)
    gpu_check.build_model_dir(spec, size, out / "model", "float32")
    return out, spec


@pytest.mark.parametrize("device, offload, fused", [
    ("cpu", False, True), ("cpu", True, None), ("cuda", False, True), ("cuda", True, None),
])
def test_adamw_is_fused_unless_offloaded(device, offload, fused, tiny_check, monkeypatch):
    from orchestrator import worker
    from orchestrator.worker import WorkerContext, run_job

    out, spec = tiny_check
    config = gpu_check.trial_config(spec, out / "model", out / "run", "ga", {}, 1e-4, 4)
    config["scaling"] = dict(config["scaling"], offload=offload)
    seen = {}

    def recording_adamw(parameters, **kwargs):
        seen.update(kwargs)
        raise _OptimizerBuilt

    # GA has no reference model, so nothing before the optimizer touches the (absent) CUDA device; the
    # model loads whole (ZeRO-3's partitioned loading needs a process group, tested in test_zero_init.py).
    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    monkeypatch.setattr(worker, "loading_for", lambda config, ctx: contextlib.nullcontext())
    with pytest.raises(_OptimizerBuilt):
        run_job(config, WorkerContext(0, 1, torch.device(device), lambda metrics, directory: None))
    assert seen["fused"] is fused
    assert seen["lr"] == 1e-4


# ---------------------------------------------------------------- the check's trial config and FLOPs
def test_trial_config_is_a_sweep_trial_with_the_checks_arguments(tiny_check, monkeypatch):
    from orchestrator import api
    from orchestrator.prepare import Prepared
    from orchestrator.worker import should_evaluate

    out, spec = tiny_check
    monkeypatch.setattr(api, "provenance", lambda: {"git_sha": "x", "versions": "{}"})
    prepared = Prepared(str(out / "model"), str(out / "model"), None, None, [], 0.0)
    base = api.base_trial_config(spec, out / "run", "gpu-check", prepared)
    sweep_trial = dict(base, job="unlearn", method="npo", params={}, trial_id="npo_check", trial_params={})
    ours = gpu_check.trial_config(spec, out / "model", out / "run", "npo", {}, 1e-5, 6)
    assert ours["training"].pop("batch_size") == 6 and ours["training"].pop("lr") == 1e-5  # the arguments
    expected_training = {k: v for k, v in sweep_trial.pop("training").items() if k not in ("batch_size", "lr")}
    assert ours.pop("training") == expected_training
    assert ours == sweep_trial
    assert ours["references"]["retain_stats"] is None  # no retain model: forget quality stays empty
    # The worker evaluates after the last epoch only (the check times training steps, not evaluations):
    # over the check's default 4 one-step epochs, only the 4th.
    assert [should_evaluate(epoch, 4, ours["evaluation"]["every"]) for epoch in (1, 2, 3, 4)] == [False] * 3 + [True]


def test_frozen_weights_cost_four_flops_per_token_and_trainable_ones_six():
    from torch.utils.flop_counter import FlopCounterMode

    # A trainable 12→12 layer feeding a frozen 12→5 one, input requiring grad (as inside a network):
    # trainable: forward 2, input grad 2, weight grad 2 per weight and token; frozen: no weight grad.
    tokens = 7
    trained, frozen = torch.nn.Linear(12, 12, bias=False), torch.nn.Linear(12, 5, bias=False)
    frozen.requires_grad_(False)
    x = torch.randn(tokens, 12, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        frozen(trained(x)).sum().backward()
    shape = {"trainable": 144, "frozen": 60, "layers": 0, "hidden": 0}
    assert counter.get_total_flops() == gpu_check.flops_per_trained_token(shape, 0.0) * tokens == (6 * 144 + 4 * 60) * tokens


def test_trained_module_shape_counts_the_model_and_the_uld_assistant_by_hand():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=32, hidden_size=8, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=16, tie_word_embeddings=True)
    # Head dim 4, one KV head: per layer q 8·8 = 64, k and v 8·4 = 32 each, o 64, gate/up/down 3·8·16 = 384,
    # two RMSNorms 16 → 592. Embedding 32·8 = 256 (tied: counted once), final norm 8.
    assert gpu_check.trained_module_shape(config, "npo", {}) == {
        "trainable": 256 + 4 * 592 + 8, "frozen": 0, "layers": 4, "hidden": 8}
    # ULD: a quarter of 4 layers = 1, frozen; LoRA rank 2 on its 7 linears, r·(in + out) each:
    # q 2·16 = 32, k 2·12 = 24, v 24, o 32, gate 2·24 = 48, up 48, down 48 → 256 trainable.
    assert gpu_check.trained_module_shape(config, "uld", {"lora_rank": 2, "lora_alpha": 2.0}) == {
        "trainable": 256, "frozen": 256 + 592 + 8, "layers": 1, "hidden": 8}


def test_mfu_is_achieved_flops_over_the_peak():
    # 1000 tokens/s × 6e9 FLOP/token = 6e12 FLOP/s over a 600 TFLOP/s peak = 1 %.
    assert gpu_check.model_flops_utilisation(1000.0, 6e9, 6e14) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        gpu_check.model_flops_utilisation(1000.0, 6e9, 0.0)


def test_reports_are_the_workers_json_lines_only():
    log = "\n".join([
        "[2025-01-01 00:00:00,000] [INFO] [config.py:1] DeepSpeed info {not json}",
        '{"epoch": 1, "status": "running", "train_seconds": 1.5, "epoch_tokens": 300}',
        "[npo_check] epoch 1/2 running forget 1.3 (200 tok/s)",
        '{"zero_optimization": {"stage": 3}}',
        '  {"epoch": 2, "status": "ok", "train_seconds": 2.5, "epoch_tokens": 300}  ',
    ])
    assert [r["epoch"] for r in gpu_check.parse_reports(log)] == [1, 2]
    # One step per epoch: epoch 2 (after warm-up) took 1.0 s for 300 tokens.
    figures = gpu_check.throughput(gpu_check.parse_reports(log), 10.0, 3000.0)
    assert figures["tokens_per_second"] == pytest.approx(300.0) and figures["mfu"] == pytest.approx(1.0)
    assert figures["status"] == "ok"


def test_the_check_launches_the_torchrun_worker_entry(tmp_path):
    from torch.distributed.run import get_args_parser

    command = gpu_check.torchrun_command(tmp_path / "npo.json")
    # What torchrun makes of it: its own module run by this interpreter, one process on this node, running
    # the worker's module entry (orchestrator/worker.py's main) on the config file.
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    args = get_args_parser().parse_args(command[3:])
    assert args.nproc_per_node == "1" and args.nnodes == "1:1" and args.master_addr == "127.0.0.1"
    assert args.module and args.training_script == "orchestrator.worker"
    assert args.training_script_args == [str(tmp_path / "npo.json")]


def test_device_memory_peak_is_the_highest_use_above_idle(monkeypatch):
    # cudaMemGetInfo faked as (free, total) readings of a 10-unit device: 2 in use before the child
    # starts (idle), then 5, 9, 4 → the child's peak is 9 − 2 = 7.
    readings = iter([(8, 10), (5, 10), (1, 10), (6, 10)])
    last = [(6, 10)]

    def mem_get_info(device):
        last[0] = next(readings, last[0])
        return last[0]

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    with gpu_check.DeviceMemoryPeak(torch.device("cuda", 0), interval=0.001) as sampled:
        while last[0] != (6, 10):
            pass
    assert sampled.peak == 7


def test_peak_memory_prefers_the_workers_own_cuda_figure():
    run = gpu_check.TorchrunResult(0, [{"epoch": 1, "peak_memory_bytes": 300}, {"epoch": 2, "peak_memory_bytes": 500}],
                                   host_peak_rss=900, seconds=1.0)

    class Sampled:
        peak = 700

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert gpu_check.peak_memory(cuda, run, Sampled())["peak_memory_bytes"] == 500
    unreported = gpu_check.TorchrunResult(0, [{"epoch": 1}], host_peak_rss=900, seconds=1.0)
    assert gpu_check.peak_memory(cuda, unreported, Sampled())["peak_memory_bytes"] == 700
    assert gpu_check.peak_memory(cpu, unreported, None)["peak_memory_bytes"] == 900


# ---------------------------------------------------------------- the check, end to end on CPU
@pytest.mark.integration
def test_gpu_check_runs_npo_and_uld_with_zero3_through_torchrun_on_cpu(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-m", "orchestrator.gpu_check", "--out", str(tmp_path),
                           "--config-size", "tiny", "--steps", "2"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=gpu_check.PROJECT_ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["zero_stage"] == 3 and summary["backend"] == "gloo" and summary["fused_adamw"]
    assert math.isfinite(summary["matmul_peak_flops"]) and summary["matmul_peak_flops"] > 0
    for method in ("npo", "uld"):
        result = summary["methods"][method]
        assert result["returncode"] == 0, (tmp_path / "logs" / f"{method}.log").read_text()[-3000:]
        assert result["status"] == "ok" and result["steps"] == 2 and result["generated"]
        config = json.loads((tmp_path / "configs" / f"{method}.json").read_text())
        assert config["scaling"]["zero_stage"] == 3 and config["model"]["dtype"] == summary["dtype"]
        for figure in ("tokens_per_second", "mfu", "peak_memory_bytes", "host_peak_rss_bytes"):
            assert math.isfinite(result[figure]) and result[figure] > 0, (method, figure, result[figure])
    assert "| npo | 0 | ok |" in (tmp_path / "gpu_check.md").read_text()


# ---------------------------------------------------------------- ZeRO-3 evaluation with gathered weights
def _gathered_evaluation_worker(rank: int, port: int, out_dir: str) -> None:
    """One gloo rank of a 2-rank ZeRO-3 gang: the same model trained by two engines, one of which
    evaluates under ``whole_weights`` between its two steps."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from orchestrator.models import build_embedded_model
    from orchestrator.zero import whole_weights

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    # Threshold 0: no parameter is persistent, so every one is partitioned outside the context.
    config = dict(deepspeed_config(3, 2, 1, 2, "float32", False, 1.0),
                  zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 0})
    engines = []
    for _ in range(2):
        model = build_embedded_model(400, 32, 2, 2, 64, 128, seed=0)
        engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters(),
                                          optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
        engines.append(engine)
    ids = torch.randint(3, 400, (2, 12), generator=torch.Generator().manual_seed(rank))
    report: dict = {}

    def train_step(engine) -> float:
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        return float(loss)

    losses = {"gathered": [train_step(engines[0])], "plain": [train_step(engines[1])]}
    with torch.no_grad():
        hooked = engines[0].module(input_ids=ids).logits
        with whole_weights([engines[0]]):
            report["available_inside"] = all(p.ds_status == ZeroParamStatus.AVAILABLE
                                             for p in engines[0].module.parameters())
            gathered = engines[0].module(input_ids=ids).logits
    report["same_logits"] = bool(torch.allclose(hooked, gathered, atol=1e-6))
    report["partitioned_after"] = all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE
                                      for p in engines[0].module.parameters())
    losses["gathered"].append(train_step(engines[0]))
    losses["plain"].append(train_step(engines[1]))
    # And the step after it leaves every weight partitioned again.
    report["partitioned_after_step"] = all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE
                                           for p in engines[0].module.parameters())
    report["losses"] = losses
    finals = []
    for engine in engines:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            finals.append(torch.cat([p.detach().flatten().clone() for p in engine.module.parameters()]))
    report["max_parameter_difference"] = float((finals[0] - finals[1]).abs().max())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


@pytest.mark.integration  # two spawned gloo processes, ~1 min on 2 cores
def test_zero3_evaluation_gathers_once_and_leaves_training_unchanged(tmp_path):
    """Inside whole_weights every weight is whole and the logits equal the per-layer-gather forward;
    afterwards the weights are partitioned again, also after the next step, which matches an engine that
    never gathered."""
    import torch.multiprocessing as mp

    mp.spawn(_gathered_evaluation_worker, args=(gpu_check.free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["available_inside"] and report["same_logits"] and report["partitioned_after"], report
        assert report["partitioned_after_step"], report
        assert report["losses"]["gathered"] == pytest.approx(report["losses"]["plain"], abs=1e-6)
        assert report["max_parameter_difference"] < 1e-6
