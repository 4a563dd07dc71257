"""ZeRO-3 loading: models are built partitioned (deepspeed.zero.Init through transformers' integration), so
no rank of a gang ever holds the whole model, and the partitions hold the checkpoint's weights."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from orchestrator.gpu_check import free_port

LAYERS, ASSISTANT_LAYERS = 4, 2


def _loading_worker(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    """One gloo rank of a 2-rank gang: load the trained model and ULD's assistant the way a ZeRO-3 trial does,
    and report what this rank holds."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    from safetensors.torch import load_file
    from transformers.integrations import is_deepspeed_zero3_enabled

    from methods import build_method
    from orchestrator.models import build_module
    from orchestrator.zero import partitioned_loading

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # torch.distributed only, as Ray Train opens a gang: DeepSpeed's comm is not initialised before loading.
    torch.distributed.init_process_group("gloo")
    model_cfg = {"path": model_dir, "dtype": "float32", "trust_remote_code": False}
    uld = build_method("uld", assistant_layers=ASSISTANT_LAYERS, lora_rank=4, lora_alpha=8.0)
    with partitioned_loading(3, 2, "float32"):
        model = build_module(model_cfg, None, build_method("ga"))
        assistant = build_module(model_cfg, None, uld)
    report = {"zero3_after_block": is_deepspeed_zero3_enabled()}
    checkpoint = load_file(str(Path(model_dir) / "model.safetensors"))
    for name, module in (("model", model), ("assistant", assistant)):
        every = dict(module.named_parameters())
        # LoRA's adapters are created after loading, outside zero.Init: the engine partitions them later.
        params = {n: p for n, p in every.items() if hasattr(p, "ds_tensor")}
        report[name] = {
            "unpartitioned": sorted(n for n in every if n not in params),
            "unpartitioned_elements": sum(every[n].numel() for n in every if n not in params),
            "layers": module.config.num_hidden_layers,
            # A partitioned parameter's own tensor is an empty placeholder; this rank's share is ds_tensor.
            "whole_elements_held": sum(p.numel() for p in params.values()),
            "share_elements": sum(p.ds_tensor.numel() for p in params.values()),
            "all_elements": sum(p.ds_numel for p in params.values()),
            "largest_share_fraction": max(p.ds_tensor.numel() / p.ds_numel for p in params.values()),
            "trainable_elements": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                      for p in every.values() if p.requires_grad),
            "trainable_all_lora": all("lora_" in n for n, p in every.items() if p.requires_grad),
        }
        differences = []
        with deepspeed.zero.GatheredParameters(list(params.values())):
            for key, p in params.items():
                plain = key.replace("base_model.model.", "").replace(".base_layer", "")
                if plain in checkpoint:
                    differences.append(float((p.detach() - checkpoint[plain]).abs().max()))
        report[name]["checked"] = len(differences)
        report[name]["max_difference"] = max(differences)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.barrier()  # both ranks done with gloo before either tears it down
    torch.distributed.destroy_process_group()


@pytest.mark.integration  # two spawned gloo processes, ~40 s on 2 cores
def test_zero3_loads_partitioned_and_the_partitions_hold_the_checkpoint(tmp_path):
    import torch.multiprocessing as mp

    from orchestrator.models import build_embedded_model

    model = build_embedded_model(400, 64, LAYERS, 2, 128, 128, seed=0)
    model.save_pretrained(tmp_path / "model")
    mp.spawn(_loading_worker, args=(free_port(), str(tmp_path / "model"), str(tmp_path)), nprocs=2, join=True)
    # Whole: embeddings (tied with lm_head) 400·64, per layer 4·64² attention + 3·64·128 MLP + 2·64 norms, final norm.
    whole = 400 * 64 + LAYERS * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    first_layers = 400 * 64 + ASSISTANT_LAYERS * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    shares = {"model": 0, "assistant": 0}
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["zero3_after_block"] is False  # a later load is whole again
        model_report, assistant = report["model"], report["assistant"]
        assert model_report["layers"] == LAYERS and model_report["all_elements"] == whole
        assert assistant["layers"] == ASSISTANT_LAYERS
        # LoRA's A (r × in) and B (out × r), r = 4, on q, k, v, o (64 → 64) and gate, up (64 → 128), down (128 → 64).
        lora = ASSISTANT_LAYERS * (4 * (4 * 64 + 64 * 4) + 3 * (4 * 64 + 128 * 4))
        assert model_report["unpartitioned"] == []
        assert all("lora_" in n for n in assistant["unpartitioned"]) and assistant["unpartitioned_elements"] == lora
        assert assistant["all_elements"] == first_layers
        assert model_report["trainable_elements"] == whole  # GA trains every weight
        assert assistant["trainable_elements"] == lora and assistant["trainable_all_lora"]
        for name in ("model", "assistant"):
            held = report[name]
            assert held["whole_elements_held"] == 0  # no parameter is whole on this rank outside a gather
            assert held["largest_share_fraction"] == 0.5  # every tensor is split in two (all sizes are even)
            shares[name] += held["share_elements"]
            # Every weight the checkpoint has arrived, on both ranks (rank 0 read the file, rank 1 did not).
            assert held["checked"] >= 4 * ASSISTANT_LAYERS and held["max_difference"] == 0.0
    # The two ranks' shares are each model's loaded weights exactly once.
    assert shares == {"model": whole, "assistant": first_layers}
