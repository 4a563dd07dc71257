"""DeepSpeed ZeRO for the worker: engine configs, frozen (partitioned) copies, whole-weight evaluation,
and saving a consolidated ``from_pretrained`` directory.

Stage 0/2 keep a whole model per rank (2 partitions gradients and optimizer states); stage 3 partitions
the weights too, from construction on (``partitioned_loading``), so a frozen reference or ULD's target is
wrapped in an optimizer-less engine.
"""
from __future__ import annotations

import os
import shutil
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch


def deepspeed_config(stage: int, micro_batch: int, grad_accum: int, world_size: int, dtype: str,
                     offload: bool, max_grad_norm: float) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if offload:
        zero["offload_param"] = {"device": "cpu"}
        zero["offload_optimizer"] = {"device": "cpu"}
    # Offload otherwise insists on DeepSpeed's own (JIT-compiled) CPU Adam.
    force_ds_optimizer = {"zero_force_ds_cpu_optimizer": False} if offload else {}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "zero_optimization": zero,
        # A torch optimizer: DeepSpeed's fused CPU Adam JIT-compiles C++ for ~70 s on first use.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        **force_ds_optimizer,
    }
    # Always written: left out, DeepSpeed 0.19 clips at its default of 1.0, so max_grad_norm 0 still clipped.
    config["gradient_clipping"] = max_grad_norm
    if dtype == "bfloat16":
        config["bf16"] = {"enabled": True}
    elif dtype == "float16":
        config["fp16"] = {"enabled": True}
    return config


def join_gang_comm() -> None:
    """DeepSpeed's comm layer on the gang's process group (Ray Train opens it with torch.distributed).
    zero.Init reads the world size from DeepSpeed's comm, not torch's: before deepspeed.initialize ever ran
    it saw a world of 1 and refused the gang's batch size."""
    import deepspeed
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        deepspeed.init_distributed(dist_backend=torch_dist.get_backend())


@contextmanager
def partitioned_loading(stage: int, world_size: int, dtype: str, offload: bool = False) -> Any:
    """ZeRO-3: models loaded inside are built under ``deepspeed.zero.Init`` (transformers' DeepSpeed
    integration: each layer's parameters are partitioned as it is created, rank 0 reads the checkpoint and
    each layer is gathered, filled and re-partitioned), so no rank ever holds the whole model. Other stages
    keep a whole model per rank: nothing changes."""
    if stage != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    join_gang_comm()
    # transformers holds only a weak reference: this name keeps the config alive for the block.
    active = HfDeepSpeedConfig(deepspeed_config(3, 1, 1, world_size, dtype, offload, 0.0))
    try:
        yield active
    finally:
        unset_hf_deepspeed_config()


def frozen_copy(reference: str, model_cfg: dict, stage: int, world_size: int, device: torch.device):
    """A frozen model for reference outputs or ULD's target. Under ZeRO-3 it is loaded partitioned
    (``partitioned_loading``) and wrapped in a DeepSpeed engine without optimizer: no worker ever holds a
    full copy."""
    from orchestrator.models import load_model

    with partitioned_loading(stage, world_size, model_cfg["dtype"]):
        model = load_model(reference, model_cfg["dtype"], model_cfg["trust_remote_code"])
    model.requires_grad_(False)
    model.eval()
    if stage != 3:
        return model.to(device)
    import deepspeed

    config = deepspeed_config(3, 1, 1, world_size, model_cfg["dtype"], False, 0.0)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.module.eval()
    # Beside the module's attributes, not a submodule: evaluation gathers the weights through the engine.
    engine.module.__dict__["zero3_engine"] = engine
    return engine.module


@contextmanager
def whole_weights(engines: list) -> Any:
    """ZeRO-3 evaluation: each engine's weights gathered once and its per-layer gather hooks lifted
    (DeepSpeed's unwrap_model_for_generation), so a generated token costs no all-gather; re-partitioned
    and hooked again on exit. Every rank holds a full copy of each model meanwhile."""
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    with ExitStack() as stack:
        for engine in engines:
            stack.enter_context(unwrap_model_for_generation(engine))
        yield


def save_consolidated(engine, tokenizer, directory: str, rank: int, stage: int) -> None:
    """Consolidate (ZeRO-3 gathers every shard) and save as a from_pretrained directory on rank 0; nothing
    without a ``directory`` (a fine-tune measured, not kept)."""
    import deepspeed

    if directory is None:
        return

    module = engine.module
    context = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None) if stage == 3 else nullcontext()
    with context:
        if rank == 0:
            tmp = Path(directory).with_name(Path(directory).name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            module.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(tmp, directory)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def fused_adamw(offload: bool) -> bool:
    """torch's fused AdamW (one kernel over all parameters, on CUDA and on the CPU): on a CPU worker it cut
    SmolLM2-135M's optimizer step 0.72 s → 0.17 s at one thread, 39 % of a batch-4 step before. Offload keeps
    DeepSpeed's own handling of CPU optimizer states."""
    return not offload


def build_engine(module: torch.nn.Module, parameters: list[torch.nn.Parameter], training: dict[str, Any],
                 scaling: dict[str, Any], dtype: str, world_size: int, device: torch.device, steps_per_epoch: int):
    """AdamW with linear warm-up and decay, wrapped with the module in a DeepSpeed engine of the configured
    ZeRO stage. Returns the engine and the parameters it trains (its own, after any wrapping)."""
    import deepspeed

    from orchestrator.steps import warmup_then_linear_decay

    optimizer = torch.optim.AdamW(parameters, lr=training["lr"], weight_decay=training["weight_decay"],
                                  fused=fused_adamw(bool(scaling["offload"])) or None)
    epochs = int(training["epochs"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear_decay(
        steps_per_epoch * epochs, int(steps_per_epoch * training["warmup_epochs"])))
    config = deepspeed_config(int(scaling["zero_stage"]), training["batch_size"], training["grad_accum"], world_size,
                              dtype, scaling["offload"], training["max_grad_norm"])
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule, config=config,
                                           model_parameters=parameters)
    return engine, [p for p in engine.module.parameters() if p.requires_grad]
