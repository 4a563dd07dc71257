"""Prepare: the dataset, tokenizer, target and retain models, and their reference evaluations.

For the embedded benchmark a tokenizer is trained locally and a small Llama is fine-tuned twice through
the same worker loop as every trial: on everything (the **target**) and on the retain split only (the
**retain** model, whose forget truth ratios define forget quality; for ``benchmark.kind: muse`` the
reference for privleak and KnowMem). With ``model.base`` a pretrained model is fine-tuned the same way, as
TOFU was built: target = base + ``full``, retain = base + the retain split, the utility sets untouched; the
base model is evaluated too (a third reference row), and the real-authors / world-facts rows it cannot
answer are dropped for the whole run (utility_rows.py). GGUF and packaged models are converted once to
``from_pretrained`` directories (model_sources.materialize). Each artefact is cached under a content hash
of what determines it, so a second run reuses it. Real checkpoints are only evaluated.
"""
from __future__ import annotations

import hashlib
import json
import os
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
    reference_rows: list[dict[str, Any]]  # evals rows for method = target / retain / base (epoch 0)
    seconds: float
    evaluation_files: dict[str, str] = field(default_factory=dict)  # method → its cached evaluation JSON
    data_hash: str = ""  # content hash of the benchmark's rows (keys every cached evaluation)
    benchmark: dict[str, Any] | None = None  # benchmark_config with the kept utility rows (None: the spec's)
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


def benchmark_config(spec: JobSpec, keep_rows: dict[str, list[str | int]] | None = None) -> dict[str, Any]:
    """How workers load the benchmark: the source and the keyword arguments of data.load_benchmark.
    ``keep_rows``: the utility rows the base model answers (prepare's choice), for every later load."""
    b = spec.benchmark
    if b.source == "embedded":
        load_args: dict[str, Any] = {"seed": spec.seed, "num_authors": b.num_authors,
                                     "questions_per_author": b.questions_per_author}
    elif b.kind == "muse":  # every split load_muse knows
        load_args = {}
    else:  # a directory or hub dataset: the splits this run reads (TOFU's retain metrics use retain_perturbed)
        utility = list(UTILITY_SPLITS) if spec.evaluation.utility_sets else []
        # optional in a directory; on the hub 4,000 rows nobody needs, unless model.base is fine-tuned on them
        local = ["full"] if Path(b.source).is_dir() or spec.model.base else []
        load_args = {"splits": [b.forget_split, b.retain_split, b.holdout_split, RETAIN_PERTURBED, *utility, *local]}
    if b.kind == "muse":  # only for MUSE, so TOFU's evaluation cache keys stay what they were
        load_args["kind"] = "muse"
    if keep_rows:
        load_args["keep_rows"] = keep_rows
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
    run side by side on one worker each; the evaluations then share one sharded gang.
    """
    from orchestrator.data import load_benchmark
    from orchestrator.model_sources import materialize

    start = time.perf_counter()
    cache = Path(spec.prepare.cache_dir).expanduser().resolve()
    bench = benchmark_config(spec)
    data = load_benchmark(bench["source"], **bench["generator"])
    data_hash = content_hash({name: rows for name, rows in sorted(data.items())})
    finetunes: list[dict[str, Any]] = []
    m, base_path = spec.model, None
    if m.base:
        base_path = materialize(m.base, cache, log)
        tokenizer_path = materialize(m.tokenizer, cache, log) if m.tokenizer else base_path
        if spec.benchmark.kind == "tofu" and spec.evaluation.utility_sets:
            bench = benchmark_config(spec, known_utility_rows(spec, data, data_hash, base_path, tokenizer_path,
                                                              cache, log))
        rehearsal = rehearsal_file(spec, base_path, tokenizer_path, cache, log) if spec.prepare.self_rehearsal else None
        paths = _finetunes(spec, finetune_key(spec, data_hash, base_path, tokenizer_path), base_path,
                           tokenizer_path, bench, cache, finetunes, log, rehearsal)
        model_path, retain_path = paths["target"], paths["retain"]
    elif m.uses_embedded_model:
        model_path, tokenizer_path, retain_path = _embedded_models(spec, data, data_hash, cache, finetunes, log)
    else:
        model_path = materialize(m.target, cache, log)
        retain_path = materialize(m.retain, cache, log) if m.retain else None
        tokenizer_path = materialize(m.tokenizer, cache, log) if m.tokenizer else model_path

    if finetunes:
        run_fit([[task] for task in finetunes], 1, spec.scaling.cpus_per_worker)
    eval_dir = evaluation_dir(spec, data_hash, model_path, retain_path, bench, base_path)
    alternates, extra = alternates_file(spec, data, data_hash, model_path, cache), []
    if alternates and not alternates.exists():
        log(f"prepare: sampling AltPO's alternate answers from the target for the {bench['forget_split']} questions")
        extra.append(dict(evaluation_task(spec, model_path, tokenizer_path, None, eval_dir / "target.json", bench),
                          job="alternates", alternates_out=str(alternates)))
    files = _reference_evaluations(spec, eval_dir, tokenizer_path, bench, run_fit, log,
                                   {"target": model_path, "retain": retain_path, "base": base_path}, extra)
    evals = {name: json.loads(Path(path).read_text())["metrics"] for name, path in files.items()}
    rows = reference_rows(evals["target"], evals.get("retain"), evals.get("base"))
    return Prepared(model_path, tokenizer_path, files.get("retain"), rows[0].get("model_utility"), rows,
                    time.perf_counter() - start, files, data_hash, bench, str(alternates) if alternates else None)


def evaluation_dir(spec: JobSpec, data_hash: str, model: str, retain: str | None,
                   bench: dict[str, Any] | None = None, base: str | None = None) -> Path:
    """Where the cached evaluation of ``model`` (against ``retain``) lives: keyed by the data (and the rows
    kept of it: ``bench``, default the spec's), the models' files, the evaluation settings and the prompt
    template."""
    key = content_hash(data_hash, model_fingerprint(model), model_fingerprint(retain), evaluation_config(spec),
                       bench or benchmark_config(spec), spec.model.prompt_template,
                       *([model_fingerprint(base)] if base else []))
    return Path(spec.prepare.cache_dir).expanduser().resolve() / "evals" / key


def _reference_evaluations(spec, eval_dir: Path, tokenizer_path: str, bench, run_fit, log,
                           models: dict[str, str | None], extra_tasks: list[dict[str, Any]]) -> dict[str, str]:
    """Each reference model (name → path or None) evaluated once in one sharded gang and cached as
    ``<eval_dir>/<name>.json``; returns name → that file. The retain model's statistics are every other
    model's forget-quality reference, so it comes first. ``extra_tasks`` share the gang."""
    retain_json = eval_dir / "retain.json" if models.get("retain") else None
    tasks: list[dict[str, Any]] = []
    for name in ("retain", "target", "base"):
        out = eval_dir / f"{name}.json"
        if models.get(name) and not out.exists():
            log(f"prepare: evaluating the {name} model {models[name]}")
            tasks.append(evaluation_task(spec, models[name], tokenizer_path, None if name == "retain" else retain_json,
                                         out, bench))
    tasks += extra_tasks
    if tasks:
        run_fit([tasks], spec.prepare.num_workers, spec.scaling.cpus_per_worker)
    from orchestrator.results import REFERENCE_METHODS

    return {name: str(eval_dir / f"{name}.json") for name in REFERENCE_METHODS if models.get(name)}


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


def known_utility_rows(spec: JobSpec, data, data_hash: str, base_path: str, tokenizer_path: str, cache: Path,
                       log: Callable[[str], None]) -> dict[str, list[str | int]]:
    """Ids of the real-authors / world-facts rows the base model answers (utility_rows.py: its greedy answer
    holds the fact's distinguishing words), cached like the models; logs how many of each split are kept."""
    from orchestrator.utility_rows import greedy_answers, known_row_ids

    splits = [name for name in UTILITY_SPLITS if data.get(name)]
    budget = spec.evaluation.max_new_tokens
    key = content_hash(data_hash, model_fingerprint(base_path), tokenizer_path, spec.model.prompt_template, budget,
                       "distinguishing-words")
    out = cache / "utility_rows" / f"{key}.json"
    if not out.exists():
        log(f"prepare: asking the base model {', '.join(splits)} to keep the rows it answers")
        rows = {name: data[name] for name in splits}
        questions = [row["question"] for name in splits for row in rows[name]]
        texts = iter(greedy_answers(base_path, tokenizer_path, questions, spec.model.prompt_template, budget,
                                    spec.evaluation.batch_size, spec.model.trust_remote_code))
        kept = {name: known_row_ids(rows[name], [next(texts) for _ in rows[name]]) for name in splits}
        _atomic_file(out, json.dumps({"keep_rows": kept, "sizes": {name: len(rows[name]) for name in splits}}))
    saved = json.loads(out.read_text())
    for name in splits:
        log(f"prepare: {name}: the base model answers {len(saved['keep_rows'][name])} of {saved['sizes'][name]} "
            "rows; utility is measured on those")
        if not saved["keep_rows"][name]:
            raise ValueError(f"prepare: the base model {spec.model.base} answers none of the {name} rows; "
                             "its utility on them cannot be measured")
    return saved["keep_rows"]


REHEARSAL_QUESTIONS = Path(__file__).resolve().parent / "assets" / "rehearsal_questions.txt"


def rehearsal_file(spec: JobSpec, base_path: str, tokenizer_path: str, cache: Path, log: Callable[[str], None]) -> str:
    """``prepare.self_rehearsal``: the base model's greedy answers to the general questions of
    REHEARSAL_QUESTIONS, as training rows (JSON), cached like the models. Only answers whose whole pair fits
    ``training.max_length`` uncut (its tokens + EOS) are kept: a cut answer would teach stopping mid-sentence."""
    from orchestrator.encoding import encode_pair
    from orchestrator.models import load_tokenizer
    from orchestrator.utility_rows import greedy_answers

    questions = [line for line in REHEARSAL_QUESTIONS.read_text("utf-8").splitlines() if line.strip()]
    m, max_length = spec.model, spec.training.max_length
    key = content_hash(questions, model_fingerprint(base_path), tokenizer_path, m.prompt_template, max_length)
    out = cache / "rehearsal" / f"{key}.json"
    if not out.exists():
        log(f"prepare: asking the base model {len(questions)} general questions to rehearse its own answers")
        texts = greedy_answers(base_path, tokenizer_path, questions, m.prompt_template, max_length,
                               spec.evaluation.batch_size, m.trust_remote_code)
        tokenizer = load_tokenizer(tokenizer_path, m.trust_remote_code)
        rows = [{"question": q, "answer": a} for q, a in zip(questions, texts)
                if a.strip() and len(encode_pair(tokenizer, q, a, m.prompt_template, max_length + 1).input_ids) <= max_length + 1]
        _atomic_file(out, json.dumps(rows))
    kept = len(json.loads(out.read_text()))
    log(f"prepare: rehearsing {kept} of {len(questions)} of the base model's own answers (the rest do not fit "
        f"training.max_length {max_length})")
    return str(out)


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
    model_key = finetune_key(spec, data_hash, size.model_dump())
    init_dir = cache / "models" / model_key / "init"
    if not (init_dir / "config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        model = build_embedded_model(len(tokenizer), size.hidden_size, size.num_layers, size.num_heads,
                                     size.intermediate_size, max(512, spec.training.max_length * 2), spec.seed)
        model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        _atomic_dir(init_dir, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    paths = _finetunes(spec, model_key, str(init_dir), str(tok_dir), benchmark_config(spec), cache, tasks, log)
    return paths["target"], str(tok_dir), paths["retain"]


def finetune_key(spec: JobSpec, *source: Any) -> str:
    """Cache key of the fine-tuned reference models: what the initial model is made from (``source``) and
    every setting of the fine-tune."""
    autocast = [spec.training.autocast] if spec.training.autocast else []  # keys without it stay as they were
    unkeyed = {"cache_dir", "num_workers"} | (set() if spec.prepare.self_rehearsal else {"self_rehearsal"})
    return content_hash(*source, spec.prepare.model_dump(exclude=unkeyed),
                        spec.model.prompt_template, spec.training.max_length, spec.seed, *autocast)


def _finetunes(spec: JobSpec, model_key: str, init_path: str, tokenizer_path: str, bench: dict[str, Any],
               cache: Path, tasks: list[dict[str, Any]], log: Callable[[str], None],
               rehearsal: str | None = None) -> dict[str, str]:
    """Where the target and retain fine-tunes of ``init_path`` are cached (under ``model_key``); a
    fine-tuning task is appended for each one not there yet (``rehearsal``: extra rows both train on)."""
    paths = {}
    for name, splits in reference_training_splits(spec).items():
        out = cache / "models" / model_key / name
        if not (out / "config.json").exists():
            log(f"prepare: fine-tuning the {name} model on {'+'.join(splits)} for {spec.prepare.epochs} epochs")
            tasks.append(dict(finetune_config(spec, init_path, tokenizer_path, splits, str(out), bench),
                              rehearsal_rows=rehearsal))
        else:
            log(f"prepare: reusing the cached {name} model {out}")
        paths[name] = str(out)
    return paths


def reference_training_splits(spec: JobSpec) -> dict[str, list[str]]:
    """What the retain and target models are fine-tuned on. MUSE: the text documents (plain LM sequences)
    plus the KnowMem questions of the same side, so KnowMem measures knowledge the model has. TOFU: the
    fictitious authors, and for the embedded model (which knows nothing) the utility sets too; a pretrained
    base is not trained on them, so they measure what it already knew."""
    b = spec.benchmark
    if b.kind == "muse":
        return {"retain": [b.retain_split, "knowmem_retain"],
                "target": [b.forget_split, b.retain_split, "knowmem_forget", "knowmem_retain"]}
    if spec.model.base:
        return {"retain": [b.retain_split], "target": ["full"]}
    return {"retain": [b.retain_split, "utility_train"], "target": ["full", "utility_train"]}


def evaluation_task(spec, model_path, tokenizer_path, retain_json: Path | None, out: Path,
                    bench: dict[str, Any] | None = None) -> dict[str, Any]:
    """Worker config for evaluating a model once (the worker's ``evaluate`` job), against the retain model's
    statistics in ``retain_json`` (None: no forget quality); ``bench``: how it loads the benchmark."""
    config = finetune_config(spec, model_path, tokenizer_path, [], None, bench)
    config.update(job="evaluate", eval_out=str(out), label="eval",
                  references={"retain_stats": str(retain_json) if retain_json else None})
    return config


def finetune_config(spec: JobSpec, model_path: str, tokenizer_path: str, splits: list[str],
                    save_to: str | None, bench: dict[str, Any] | None = None) -> dict[str, Any]:
    """Worker config for fine-tuning a reference model on ``splits`` (the worker's ``finetune`` job);
    ``bench``: how it loads the benchmark (default: ``benchmark_config(spec)``)."""
    p = spec.prepare
    training = spec.training.model_dump() | {"lr": p.lr, "epochs": p.epochs, "batch_size": p.batch_size,
                                             "grad_accum": 1, "weight_decay": 0.0, "warmup_epochs": 0.0,
                                             "lora": None, "gradient_checkpointing": False}
    return {
        "job": "finetune", "seed": spec.seed, "train_splits": splits, "save_to": save_to,
        "paraphrase_augmentation": p.paraphrase_augmentation, "label": Path(save_to).name if save_to else "eval",
        "model": model_config(spec, model_path, tokenizer_path), "training": training,
        "scaling": spec.scaling.model_dump() | {"zero_stage": 0 if spec.scaling.zero_stage < 3 else 3},
        "benchmark": bench or benchmark_config(spec), "evaluation": evaluation_config(spec), "references": {},
        "threads_per_worker": spec.scaling.threads_per_worker,
    }


def model_config(spec: JobSpec, model_path: str, tokenizer_path: str) -> dict[str, Any]:
    m = spec.model
    return {"path": model_path, "tokenizer": tokenizer_path, "dtype": m.dtype,
            "trust_remote_code": m.trust_remote_code, "prompt_template": m.prompt_template}


# Forget quality and privleak compare a model with the retain model; for the retain model itself both hold
# by definition (FQ 1, privleak 0), which is not a measurement: its row leaves them null and says why.
RETAIN_IS_THE_REFERENCE = "the retain model is the reference this metric compares with"


def reference_rows(target: dict[str, Any], retain: dict[str, Any] | None,
                   base: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Evals rows for the reference points (results.REFERENCE_METHODS); utility loss is relative to the
    target. The base model (``model.base``) is measured against the retain model like the target."""
    target_mu = target.get("model_utility")
    rows = [evaluated_row(target, "target", "target", target_mu)]
    if retain is not None:
        rows.append(evaluated_row(dict(retain, forget_quality=None, privleak=None), "retain", "retain", target_mu,
                                  {"forget_quality": RETAIN_IS_THE_REFERENCE, "privleak": RETAIN_IS_THE_REFERENCE}))
    if base is not None:
        rows.append(evaluated_row(base, "base", "base", target_mu))
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


def _atomic_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_dir(directory: Path, write: Callable[[Path], Any]) -> None:
    import shutil

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
