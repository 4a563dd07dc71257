"""Prepare: the dataset, tokenizer, target and retain models, and their reference evaluations.

For the embedded benchmark a tokenizer is trained locally and a small Llama is fine-tuned twice through
the same worker loop as every trial: on everything (the **target**) and on the retain split only (the
**retain** model, whose forget truth ratios define forget quality; for ``benchmark.kind: muse`` the
reference for privleak and KnowMem). Each artefact is cached under a
content hash of what determines it, so a second run reuses it. Real checkpoints are only evaluated.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from orchestrator.data.validation import RETAIN_PERTURBED, UTILITY_SPLITS
from orchestrator.spec import JobSpec



@dataclass
class Prepared:
    """What every trial needs, as paths and numbers (trials run in other processes)."""

    model_path: str
    tokenizer_path: str
    retain_stats: str | None  # ReferenceStats JSON of the retain model (forget truth ratios, MIA AUCs)
    target_model_utility: float | None
    reference_rows: list[dict[str, Any]]  # evals rows for method = target / retain (epoch 0)
    seconds: float
    evaluation_files: dict[str, str] = field(default_factory=dict)  # method → its cached evaluation JSON
    data_hash: str = ""  # content hash of the benchmark's rows (keys every cached evaluation)
    alternates: str | None = None  # AltPO's generated alternates (JSON), when a swept method reads them


def model_fingerprint(reference: str | None) -> Any:
    """What identifies a model for the evaluation cache: a local directory or file by the name, size and
    modification time of every file in it (a model changed on disk is scored again); a hub id by itself."""
    if reference is None:
        return None
    path = Path(reference)
    if not path.exists():
        return reference
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [reference] + [(str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns)
                          for p in files]


def content_hash(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def benchmark_config(spec: JobSpec) -> dict[str, Any]:
    """How workers load the benchmark: the source and the keyword arguments of data.load_benchmark."""
    b = spec.benchmark
    if b.source == "embedded":
        load_args: dict[str, Any] = {"seed": spec.seed, "num_authors": b.num_authors,
                                     "questions_per_author": b.questions_per_author}
    elif b.kind == "muse":  # every split load_muse knows
        load_args = {}
    else:  # a directory or hub dataset: the splits this run reads (TOFU's retain metrics use retain_perturbed)
        utility = list(UTILITY_SPLITS) if spec.evaluation.utility_sets else []
        local = ["full"] if Path(b.source).is_dir() else []  # optional there; on the hub 4,000 rows nobody needs
        load_args = {"splits": [b.forget_split, b.retain_split, b.holdout_split, RETAIN_PERTURBED, *utility, *local]}
    if b.kind == "muse":  # only for MUSE, so TOFU's evaluation cache keys stay what they were
        load_args["kind"] = "muse"
    return {"source": b.source, "kind": b.kind, "forget_axis": spec.forget_axis(), "generator": load_args,
            "forget_split": b.forget_split,
            "retain_split": b.retain_split, "holdout_split": b.holdout_split}


def evaluation_config(spec: JobSpec) -> dict[str, Any]:
    return spec.evaluation.model_dump()


def prepare(spec: JobSpec, run_fit: Callable[[list[list[dict[str, Any]]], int, float], None],
            log: Callable[[str], None] = print) -> Prepared:
    """Build or reuse the reference models.

    ``run_fit(gangs, num_workers, cpus)`` runs each gang's task list through the worker loop, the gangs
    concurrently (TorchTrainers in a sweep). The retain and target fine-tunes are independent, so they
    run side by side on one worker each; the two evaluations then share one sharded gang.
    """
    from orchestrator.data import load_benchmark

    start = time.perf_counter()
    cache = Path(spec.prepare.cache_dir).expanduser().resolve()
    bench = benchmark_config(spec)
    data = load_benchmark(bench["source"], **bench["generator"])
    data_hash = content_hash({name: rows for name, rows in sorted(data.items())})
    finetunes: list[dict[str, Any]] = []
    if spec.model.target == "embedded":
        model_path, tokenizer_path, retain_path = _embedded_models(spec, data, data_hash, cache, finetunes, log)
    else:
        model_path, retain_path = spec.model.target, spec.model.retain
        tokenizer_path = spec.model.tokenizer or spec.model.target

    eval_dir = evaluation_dir(spec, data_hash, model_path, retain_path)
    if finetunes:
        run_fit([[task] for task in finetunes], 1, spec.scaling.cpus_per_worker)
    tasks: list[dict[str, Any]] = []
    retain_json = eval_dir / "retain.json" if retain_path else None
    if retain_json and not retain_json.exists():
        log(f"prepare: evaluating the retain model {retain_path}")
        tasks.append(evaluation_task(spec, retain_path, tokenizer_path, None, retain_json))
    target_json = eval_dir / "target.json"
    if not target_json.exists():
        log(f"prepare: evaluating the target model {model_path}")
        tasks.append(evaluation_task(spec, model_path, tokenizer_path, retain_json, target_json))
    alternates = alternates_file(spec, data, data_hash, model_path, cache)
    if alternates and not alternates.exists():
        log(f"prepare: sampling AltPO's alternate answers from the target for the {bench['forget_split']} questions")
        tasks.append(dict(evaluation_task(spec, model_path, tokenizer_path, None, target_json), job="alternates",
                          alternates_out=str(alternates)))
    if tasks:
        run_fit([tasks], spec.prepare.num_workers, spec.scaling.cpus_per_worker)
    target_eval = json.loads(target_json.read_text())
    retain_eval = json.loads(retain_json.read_text()) if retain_json else None
    rows = reference_rows(target_eval["metrics"], retain_eval["metrics"] if retain_eval else None)
    files = {"target": str(target_json)} | ({"retain": str(retain_json)} if retain_json else {})
    return Prepared(model_path, tokenizer_path, str(retain_json) if retain_json else None,
                    rows[0].get("model_utility"), rows, time.perf_counter() - start, files, data_hash,
                    str(alternates) if alternates else None)


def alternates_file(spec: JobSpec, data, data_hash: str, model_path: str, cache: Path) -> Path | None:
    """Where AltPO's generated alternates are cached, or None when no swept method reads them or the forget
    rows bring their own (an ``alternate`` field)."""
    from methods import describe

    wanted = spec.sweep is not None and any("alternate" in describe(e.name).splits for e in spec.sweep.methods)
    if not wanted or all(row.get("alternate") for row in data[spec.benchmark.forget_split]):
        return None
    key = content_hash(data_hash, model_fingerprint(model_path), spec.model.prompt_template, spec.seed,
                       spec.benchmark.forget_split, spec.evaluation.max_new_tokens)
    return cache / "alternates" / f"{key}.json"


def evaluation_dir(spec: JobSpec, data_hash: str, model: str, retain: str | None) -> Path:
    """Where the cached evaluation of ``model`` (against ``retain``) lives: keyed by the data, both models'
    files, the evaluation settings and the prompt template."""
    key = content_hash(data_hash, model_fingerprint(model), model_fingerprint(retain), evaluation_config(spec),
                       benchmark_config(spec), spec.model.prompt_template)
    return Path(spec.prepare.cache_dir).expanduser().resolve() / "evals" / key


def _embedded_models(spec, data, data_hash, cache, tasks, log) -> tuple[str, str, str]:
    """Tokenizer and initial model (built here, fast); fine-tuning tasks appended for what is not cached."""
    from orchestrator.models import build_embedded_model
    from orchestrator.tokenizer import benchmark_texts, train_tokenizer

    size = spec.model.embedded
    tok_dir = cache / "tokenizers" / content_hash(data_hash, size.vocab_size, spec.model.prompt_template)
    if not (tok_dir / "tokenizer.json").exists():
        log(f"prepare: training a {size.vocab_size}-token BPE tokenizer")
        _atomic_dir(tok_dir, lambda tmp: train_tokenizer(benchmark_texts(data, spec.model.prompt_template),
                                                         size.vocab_size).save_pretrained(tmp))
    model_key = content_hash(data_hash, size.model_dump(), spec.prepare.model_dump(exclude={"cache_dir", "num_workers"}),
                             spec.model.prompt_template, spec.training.max_length, spec.seed)
    init_dir = cache / "models" / model_key / "init"
    if not (init_dir / "config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        model = build_embedded_model(len(tokenizer), size.hidden_size, size.num_layers, size.num_heads,
                                     size.intermediate_size, max(512, spec.training.max_length * 2), spec.seed)
        model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        _atomic_dir(init_dir, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    paths = {}
    for name, splits in reference_training_splits(spec).items():
        out = cache / "models" / model_key / name
        if not (out / "config.json").exists():
            log(f"prepare: fine-tuning the {name} model on {'+'.join(splits)} for {spec.prepare.epochs} epochs")
            tasks.append(finetune_config(spec, str(init_dir), str(tok_dir), splits, str(out)))
        else:
            log(f"prepare: reusing the cached {name} model {out}")
        paths[name] = str(out)
    return paths["target"], str(tok_dir), paths["retain"]


def reference_training_splits(spec: JobSpec) -> dict[str, list[str]]:
    """What the embedded retain and target models are fine-tuned on. MUSE: the text documents (plain LM
    sequences) plus the KnowMem questions of the same side, so KnowMem measures knowledge the model has."""
    b = spec.benchmark
    if b.kind == "muse":
        return {"retain": [b.retain_split, "knowmem_retain"],
                "target": [b.forget_split, b.retain_split, "knowmem_forget", "knowmem_retain"]}
    return {"retain": [b.retain_split, "utility_train"], "target": ["full", "utility_train"]}


def evaluation_task(spec, model_path, tokenizer_path, retain_json: Path | None, out: Path) -> dict[str, Any]:
    """Worker config for evaluating a model once (the worker's ``evaluate`` job), against the retain model's
    statistics in ``retain_json`` (None: no forget quality)."""
    config = finetune_config(spec, model_path, tokenizer_path, [], None)
    config.update(job="evaluate", eval_out=str(out), label="eval",
                  references={"retain_stats": str(retain_json) if retain_json else None})
    return config


def finetune_config(spec: JobSpec, model_path: str, tokenizer_path: str, splits: list[str],
                    save_to: str | None) -> dict[str, Any]:
    """Worker config for fine-tuning a reference model on ``splits`` (the worker's ``finetune`` job)."""
    p = spec.prepare
    training = spec.training.model_dump() | {"lr": p.lr, "epochs": p.epochs, "batch_size": p.batch_size,
                                             "grad_accum": 1, "weight_decay": 0.0, "warmup_epochs": 0.0,
                                             "lora": None, "gradient_checkpointing": False}
    return {
        "job": "finetune", "seed": spec.seed, "train_splits": splits, "save_to": save_to,
        "paraphrase_augmentation": p.paraphrase_augmentation, "label": Path(save_to).name if save_to else "eval",
        "model": model_config(spec, model_path, tokenizer_path), "training": training,
        "scaling": spec.scaling.model_dump() | {"zero_stage": 0 if spec.scaling.zero_stage < 3 else 3},
        "benchmark": benchmark_config(spec), "evaluation": evaluation_config(spec), "references": {},
        "threads_per_worker": spec.scaling.threads_per_worker,
    }


def model_config(spec: JobSpec, model_path: str, tokenizer_path: str) -> dict[str, Any]:
    m = spec.model
    return {"path": model_path, "tokenizer": tokenizer_path, "dtype": m.dtype,
            "trust_remote_code": m.trust_remote_code, "prompt_template": m.prompt_template}


# Forget quality and privleak compare a model with the retain model; for the retain model itself both hold
# by definition (FQ 1, privleak 0), which is not a measurement: its row leaves them null and says why.
RETAIN_IS_THE_REFERENCE = "the retain model is the reference this metric compares with"


def reference_rows(target: dict[str, Any], retain: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Evals rows for the two reference points; utility loss is relative to the target."""
    target_mu = target.get("model_utility")
    rows = [evaluated_row(target, "target", "target", target_mu)]
    if retain is not None:
        rows.append(evaluated_row(dict(retain, forget_quality=None, privleak=None), "retain", "retain", target_mu,
                                  {"forget_quality": RETAIN_IS_THE_REFERENCE, "privleak": RETAIN_IS_THE_REFERENCE}))
    return rows


def evaluated_row(metrics: dict[str, Any], method: str, trial_id: str, target_mu: float | None,
                  reasons: dict[str, str] | None = None) -> dict[str, Any]:
    """An evals row (epoch 0) from one evaluation's metrics, with utility loss against the target's model
    utility and why each null metric is null."""
    row = dict(metrics, method=method, trial_id=trial_id, epoch=0, status="ok", params="{}")
    why = dict(row.pop("not_measured", None) or {}) | (reasons or {})
    mu = row.get("model_utility")
    row["utility_loss"] = 1.0 - mu / target_mu if mu is not None and target_mu else None
    if row["utility_loss"] is not None:
        why.pop("utility_loss", None)
    elif mu is not None:
        why["utility_loss"] = ("the target's model utility is 0" if target_mu == 0
                               else "the target's model utility was not measured")
    row["not_measured"] = json.dumps(why, sort_keys=True)
    return row


def _atomic_dir(directory: Path, write: Callable[[Path], Any]) -> None:
    import shutil

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
