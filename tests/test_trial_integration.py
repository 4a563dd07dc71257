"""End to end inside a real local Ray: ZeRO-3 gangs for the methods with a reference model or an assistant,
LoRA with gradient checkpointing. (2-worker ZeRO-2 GA/GradDiff trials: tests/test_sweep.py's grid run.)"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from methods.base import MethodInputs, UnlearningMethod
from orchestrator.spec import parse_spec
from tests.conftest import TINY_SPEC, tiny_spec

pytestmark = pytest.mark.integration


def test_reference_methods_uld_and_mollm_under_zero3(ray_local, tiny_cache, tmp_path):
    """NPO and RMU need the frozen reference, partitioned by ZeRO-3 like the trained model; ULD trains an
    assistant and is evaluated as target − α·assistant; MOLLM takes the multi-objective update."""
    from orchestrator.api import run

    spec = parse_spec(tiny_spec(
        tiny_cache,
        training={"epochs": 1, "batch_size": 4, "max_length": 64, "warmup_epochs": 0},
        scaling={"num_workers": 2, "cpus_per_worker": 0.99, "zero_stage": 3},
        sweep={"methods": [
            {"name": "npo", "space": {"lr": {"grid": [1e-4]}}, "params": {"epochs": 1}},
            {"name": "rmu", "params": {"layer": 0, "epochs": 1}, "space": {"lr": {"grid": [1e-4]}}},
            {"name": "uld", "params": {"assistant_layers": 1, "lora_rank": 4, "lora_alpha": 4, "epochs": 1},
             "space": {"lr": {"grid": [1e-3]}}},
            {"name": "mollm", "params": {"epochs": 1}, "space": {"lr": {"grid": [1e-4]}}},
        ]},
    ))
    result = run(spec, run_dir=tmp_path / "run", log=lambda line: None)
    final = {r["method"]: r for r in result.evals.to_pylist() if r["status"] == "ok" and r["epoch"] == 1}
    assert set(final) >= {"npo", "rmu", "uld", "mollm"}
    for method in ("npo", "rmu", "uld", "mollm"):
        row = final[method]
        assert row["zero_stage"] == 3 and row["num_workers"] == 2
        assert row["forget_quality"] is not None and row["model_utility"] is not None
    # MOLLM reports the mean common-descent weights of the epoch; they lie on the simplex.
    weights = [value for key, value in final["mollm"].items() if key.startswith("extra.lambda.") and value is not None]
    assert weights and sum(weights) == pytest.approx(1.0, abs=1e-6)


@dataclass(frozen=True)
class CheckpointProbeParams:
    beta: float = 0.1
    alpha: float = 1.0
    probe_file: str = ""  # where the worker writes what it saw


class NPOCheckpointProbe(UnlearningMethod):
    """NPO's objectives (methods/npo.py's own class), plus a process-wide forward pre-hook that counts, in
    the trial's worker, the forwards of each decoder layer's MLP run with grad in training mode, and the
    decoder layers' ``gradient_checkpointing`` flags. Under activation checkpointing every layer runs twice
    per step (the forward, then its recomputation in the backward pass); evaluation, the reference model and
    the end-of-epoch finiteness check run in eval mode or without grad and are not counted."""

    Params = CheckpointProbeParams
    splits = ("forget", "retain")
    reference_splits = ("forget",)

    def __init__(self, params: CheckpointProbeParams) -> None:
        super().__init__(params)
        from methods.npo import NPO, NPOParams

        self.npo = NPO(NPOParams(beta=params.beta, alpha=params.alpha))
        self.seen = {"mlp_forwards_with_grad": 0, "gradient_checkpointing_flags": []}
        torch.nn.modules.module.register_module_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        name = type(module).__name__
        if name == "LlamaDecoderLayer":
            flags = self.seen["gradient_checkpointing_flags"]
            flags[:] = sorted(set(flags) | {bool(getattr(module, "gradient_checkpointing", False))})
        elif name == "LlamaMLP":
            self.seen["mlp_forwards_with_grad"] += 1
        else:
            return
        Path(self.params.probe_file).write_text(json.dumps(self.seen))

    def objectives(self, inputs: MethodInputs) -> dict[str, torch.Tensor]:
        return self.npo.objectives(inputs)


def _lora_module_names(state: dict[str, torch.Tensor]) -> set[str]:
    """Module paths (as in the plain model) that carry a LoRA adapter in a peft model's state dict."""
    return {key.removeprefix("base_model.model.").split(".lora_A.")[0] for key in state if ".lora_A." in key}


def test_lora_and_gradient_checkpointing(ray_local, tiny_cache, tmp_path):
    """A LoRA trial with gradient checkpointing: the checkpoint holds an adapter on every linear layer but
    lm_head, only the adapter moved (every other weight is bit-identical to the target's), and the worker
    really recomputed activations (each layer's MLP ran twice per step with grad)."""
    from methods.base import _REGISTRY, register_method
    from orchestrator.api import run

    probe = tmp_path / "probe.json"
    register_method("npo_checkpoint_probe")(NPOCheckpointProbe)
    try:
        spec = parse_spec(tiny_spec(
            tiny_cache,
            training={"epochs": 1, "batch_size": 4, "max_length": 64, "warmup_epochs": 0, "lr": 1e-3,
                      "gradient_checkpointing": True, "lora": {"rank": 4, "alpha": 8}},
            scaling={"num_workers": 1, "cpus_per_worker": 0.99, "zero_stage": 2},
            # GradNorm's MIA runs forwards with grad in train mode too; this test counts training steps only.
            evaluation=dict(TINY_SPEC["evaluation"], gradnorm=False),
            sweep={"methods": [{"name": "npo_checkpoint_probe", "params": {"probe_file": str(probe)},
                                "space": {"lr": {"grid": [1e-3]}}}]},
        ))
        result = run(spec, run_dir=tmp_path / "run", log=lambda line: None)
    finally:
        _REGISTRY.pop("npo_checkpoint_probe")
    rows = [r for r in result.evals.to_pylist() if r["method"] == "npo_checkpoint_probe"]
    assert rows and rows[-1]["status"] == "ok" and rows[-1]["forget_prob"] is not None
    (model_states,) = (tmp_path / "run" / "train").glob("npo_checkpoint_probe_*/checkpoint_*/ckpt/mp_rank_00_model_states.pt")
    base_config = json.loads((tmp_path / "run" / "run.json").read_text())["base_config"]
    check_lora_checkpointed_trial(json.loads(probe.read_text()), rows[-1]["step"], model_states,
                                  Path(base_config["model"]["path"]))


def check_lora_checkpointed_trial(seen: dict, steps: int, model_states: Path, target_dir: Path) -> None:
    """What a 1-epoch LoRA + gradient-checkpointing NPO trial on the tiny job must leave: the probe's counts
    from the worker, and the trial's DeepSpeed checkpoint (the trained peft module) against the target."""
    from safetensors.torch import load_file

    # Activation checkpointing was on in the worker: the flag on every decoder layer, and per optimizer
    # step 2 splits (forget, retain) × 2 layers MLP forwards, each run twice (forward + recomputation).
    assert seen["gradient_checkpointing_flags"] == [True]
    assert steps == 2 and seen["mlp_forwards_with_grad"] == steps * 2 * 2 * 2  # 6 forget rows / batch 4

    trained = torch.load(model_states, map_location="cpu", weights_only=False)["module"]
    target = load_file(target_dir / "model.safetensors")
    # An adapter on each of the 7 linear layers of both decoder layers (lm_head excluded).
    assert _lora_module_names(trained) == {f"model.layers.{i}.{module}" for i in (0, 1) for module in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    # peft starts every lora_B at zero: all of them moved. Every other weight is the target's, bit for bit.
    lora_b = [key for key in trained if ".lora_B." in key]
    assert len(lora_b) == 14 and all(trained[key].abs().max() > 0 for key in lora_b)
    frozen = {key.removeprefix("base_model.model.").replace(".base_layer.", "."): value
              for key, value in trained.items() if ".lora_" not in key}
    assert set(frozen) == set(target)  # the same 21 tensors (lm_head tied to the embedding, saved under both)
    assert [key for key, value in frozen.items() if not torch.equal(value, target[key])] == []
