"""Robustness probes in a trial's gang: does the forgetting survive relearning or quantization?

While the trial runs, the epoch the comparison would represent it by (``scores.choose_row``: best forget
score under the utility ceiling) is kept as a DeepSpeed checkpoint beside the run (``probes/<trial>/``);
with ``robustness.epochs: every``, each evaluated epoch is. After the last epoch the gang loads it, rank 0
gathers the weights into ordinary modules and attacks them (the maths is in ``robustness.py``), and each
attack's evaluation becomes an evals row with ``probe`` set: same metric columns, so one query compares
before and after. Rows are written once: a trial resumed after a crash skips the probes it finished.

- ``int8`` / ``int4``: round-to-nearest per-output-channel weights of every linear layer (a LoRA model merged
  first, as it is served); ULD quantizes the target and the merged assistant, the composite as served.
- ``relearn``: ``relearn_epochs`` of plain NLL fine-tuning (AdamW, the trial's lr unless set) on a seeded
  ``relearn_fraction`` of the forget pairs, then the suite on the REST of the forget set, forget quality
  against the retain model's truth ratios on that same rest. The attack pairs are never scored. For ULD the
  attacker fine-tunes the target the composite is served from (the assistant is what unlearned; it stays).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import time

from orchestrator.scores import choose_row

PROBE_TAG = "probe"


def probe_dir(config: dict[str, Any]) -> Path:
    return Path(config["run_dir"]) / "probes" / config["trial_id"]


def wanted(config: dict[str, Any]) -> bool:
    return bool(config.get("robustness", {}).get("probes"))


def keep_if_chosen(config: dict[str, Any], engine, history: list[dict[str, Any]], epoch: int) -> None:
    """After an evaluation (every rank: saving is collective): keep this epoch's weights if the probes will
    attack it."""
    if not wanted(config):
        return
    if config["robustness"]["epochs"] == "every" or _chosen_epochs(config, history) == [epoch]:
        tag = f"e{epoch}" if config["robustness"]["epochs"] == "every" else PROBE_TAG
        engine.save_checkpoint(str(probe_dir(config)), tag=tag, client_state={"epoch": epoch},
                               save_latest=False)


def _chosen_epochs(config: dict[str, Any], history: list[dict[str, Any]]) -> list[int]:
    evaluated = [h for h in history if "epoch" in h and h.get("forget_prob") is not None]
    if not evaluated:
        return []
    if config["robustness"]["epochs"] == "every":
        return [h["epoch"] for h in evaluated]
    row, _ = choose_row(evaluated, config["utility_ceiling"], config["benchmark"]["forget_axis"])
    return [row["epoch"]]


def run_probes(config: dict[str, Any], ctx, engine, method, tokenizer, data, history: list[dict[str, Any]]) -> None:
    """Every probe on every chosen epoch not probed yet; rank 0 attacks and writes, the others wait."""
    from orchestrator.results import has_evals

    for epoch in _chosen_epochs(config, history):
        todo = [p for p in config["robustness"]["probes"] if not has_evals(config["run_dir"], config["trial_id"], epoch, p)]
        if not todo:
            continue
        tag = f"e{epoch}" if config["robustness"]["epochs"] == "every" else PROBE_TAG
        engine.load_checkpoint(str(probe_dir(config)), tag=tag, load_module_only=True,
                               load_optimizer_states=False, load_lr_scheduler_states=False)
        state = _gathered_state(engine, ctx.rank, int(config["scaling"]["zero_stage"]))
        if ctx.rank == 0:
            for probe in todo:
                _probe_and_write(config, ctx, method, state, probe, epoch, tokenizer, data)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    if ctx.rank == 0:  # every probe written: the kept weights (a whole engine checkpoint, 2.1 GB for 135M) go
        shutil.rmtree(probe_dir(config), ignore_errors=True)


def _gathered_state(engine, rank: int, stage: int) -> dict[str, torch.Tensor] | None:
    """The trained module's whole weights on rank 0 (ZeRO-3 gathers the shards; collective)."""
    import contextlib

    import deepspeed

    parameters = list(engine.module.parameters())
    gather = deepspeed.zero.GatheredParameters(parameters, modifier_rank=None) if stage == 3 else contextlib.nullcontext()
    with gather:
        if rank == 0:
            return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
    return None


# robustness.suite: forget — what a probe then leaves unscored, and why
UTILITY_SIDE = ("model_utility", "utility_loss", "retain_", "ra_", "wf_", "knowmem_retain")
FORGET_SUITE_ONLY = "robustness.suite is forget: a probe scores the forget side only"


def _probe_and_write(config, ctx, method, state, probe: str, epoch: int, tokenizer, data) -> None:
    from orchestrator.results import write_evals
    from orchestrator.trial_report import evals_row

    started = time.perf_counter()
    result = _attack_and_score(config, ctx, method, state, probe, tokenizer, data)
    reasons = dict(result.not_measured)
    if config["robustness"].get("suite") == "forget":
        reasons.update({name: FORGET_SUITE_ONLY for name, value in result.metrics.items()
                        if value is None and name.startswith(UTILITY_SIDE)})
    if probe == "relearn" and result.metrics.get("privleak") is None and config["references"].get("retain_stats"):
        reasons["privleak"] = "relearn scores the rest of the forget set; the retain model's MIA AUC is over all of it"
    metrics = dict(result.metrics, status="ok", epoch=epoch, probe=probe, eval_seconds=time.perf_counter() - started,
                   not_measured=json.dumps(reasons, sort_keys=True))
    write_evals(config["run_dir"], [evals_row(config, 1, metrics)], config["trial_id"], epoch, probe)
    print(f"[{config['trial_id']}] probe {probe} on epoch {epoch}: forget prob {result.metrics.get('forget_prob')}, "
          f"FQ {result.metrics.get('forget_quality')}", flush=True)


def _attack_and_score(config, ctx, method, state, probe: str, tokenizer, data):
    """The attacked model(s) as a scorer, evaluated on one process (rank 0)."""
    from orchestrator.evaluation.scorer import ModelScorer
    from orchestrator.models import load_model
    from orchestrator.robustness import merged_for_quantization, quantize_copy, quantize_uld, relearn_copy
    from orchestrator.models import build_module

    module = build_module(config["model"], config["training"].get("lora"), method)
    module.load_state_dict(state)
    module.to(ctx.device).eval()
    model_cfg, bench = config["model"], config["benchmark"]
    target = (load_model(model_cfg["path"], model_cfg["dtype"], model_cfg["trust_remote_code"]).to(ctx.device).eval()
              if method.trains == "assistant" else None)
    forget = list(data[bench["forget_split"]])
    keep = list(range(len(forget)))
    if probe == "relearn":
        keep, batches = _relearn_batches(config, tokenizer, forget)
        # the served model: ULD's target, else the model with any LoRA merged into its weights
        attacked = target if target is not None else merged_for_quantization(module)
        attacked, _ = relearn_copy(attacked, batches, config["robustness"]["relearn_lr"] or config["training"]["lr"],
                                   config["robustness"]["relearn_epochs"])
        attacked.eval()
        target, module = (attacked, module) if target is not None else (None, attacked)
        scorer = _scorer(method, target, module)
    else:
        bits = 8 if probe == "int8" else 4
        if target is not None:
            quantized = quantize_uld(target, module, bits)
            scorer = _scorer(method, quantized.target, quantized.assistant)
        else:
            scorer = ModelScorer(quantize_copy(module, bits).eval())
    return _evaluate_rest(config, ctx, scorer, tokenizer, data, keep)


def _scorer(method, target, module):
    from orchestrator.evaluation.scorer import ModelScorer

    if target is None:
        return ModelScorer(module)
    from orchestrator.uld import LogitDifferenceScorer

    return LogitDifferenceScorer(target, module, method.params.alpha, method.params.filter_rate)


def _relearn_batches(config, tokenizer, forget: list[dict]) -> tuple[list[int], list[dict[str, torch.Tensor]]]:
    """(the forget rows left to score, the attack's batches): the attack subset is fixed by the seed."""
    from orchestrator.encoding import collate, encode_pair, pad_id
    from orchestrator.robustness import relearn_split

    attack, rest = relearn_split(len(forget), config["robustness"]["relearn_fraction"], int(config["seed"]))
    template, length = config["model"]["prompt_template"], config["training"]["max_length"]
    examples = [encode_pair(tokenizer, forget[i]["question"], forget[i]["answer"], template, length) for i in attack]
    size = config["training"]["batch_size"]
    return rest, [collate(examples[s:s + size], pad_id(tokenizer)) for s in range(0, len(examples), size)]


def _evaluate_rest(config, ctx, scorer, tokenizer, data, keep: list[int]):
    """The suite on one process, the forget split cut to ``keep`` and the retain model's statistics with it."""
    from orchestrator.evaluation.suite import ReferenceStats, evaluate
    from orchestrator.evaluation.config import eval_config

    bench, refs = config["benchmark"], config["references"]
    data = dict(data, **{bench["forget_split"]: [data[bench["forget_split"]][i] for i in keep]})
    settings, retain_split = eval_config(config), bench["retain_split"]
    if config["robustness"].get("suite") == "forget":  # the forget side only: no retain, utility or MUSE sets
        data = {name: data[name] for name in (bench["forget_split"], bench["holdout_split"]) if name in data}
        settings, retain_split = replace(settings, utility_sets=False), None
    reference = None
    if refs.get("retain_stats"):
        full = ReferenceStats.from_json(Path(refs["retain_stats"]).read_text())
        cut = len(keep) < len(full.forget_truth_ratios)
        losses = dict(full.mia_losses)
        if cut and "forget" in losses:
            losses["forget"] = [losses["forget"][i] for i in keep]
        # privleak compares AUCs over the same forget set: the retain model's is over the whole one, so a
        # relearn probe (scored on the rest) has none to compare with
        reference = ReferenceStats([full.forget_truth_ratios[i] for i in keep], {} if cut else full.mia_auc, losses)
    with torch.no_grad():
        return evaluate(scorer, tokenizer, data, settings, forget_split=bench["forget_split"],
                        retain_split=retain_split, holdout_split=bench["holdout_split"],
                        retain_reference=reference, target_model_utility=refs.get("target_model_utility"),
                        rank=0, world_size=1)
