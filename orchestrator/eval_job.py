"""``unlearn eval``: score models on a benchmark without training, into the same tables a sweep writes.

The spec's reference models (target and retain, prepared and cached as for a sweep) and any further models
(a ``from_pretrained`` directory or hub id each) are evaluated with the sweep's own evaluation job, against
the retain model when there is one (forget quality), and land as epoch-0 rows of ``evals/`` and
``samples/`` in the output directory, ranked like trials. Without a cluster address each evaluation runs in
one local process; with one (``--address``, ``ray.address``, ``RAY_ADDRESS``) as a Ray gang of
``prepare.num_workers``.
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from orchestrator.errors import SpecError
from orchestrator.spec import JobSpec, looks_like_path

if TYPE_CHECKING:
    import pyarrow as pa

EVALUATED_METHOD = "model"  # ``method`` of a row scoring a model given to unlearn eval


@dataclass
class EvalOutcome:
    """What ``unlearn eval`` wrote and measured."""

    out_dir: Path
    evals: "pa.Table"
    samples: "pa.Table"
    ranking: "pa.Table"
    summary: str


def named_models(references: list[str]) -> dict[str, str]:
    """``NAME=REF`` or ``REF`` (named after its last path part) → {name: reference}; names are unique and
    none is a reference row's (target, retain, base)."""
    from orchestrator.results import REFERENCE_METHODS

    models: dict[str, str] = {}
    for item in references:
        name, sep, reference = item.partition("=")
        if not sep:
            name, reference = Path(item.rstrip("/")).name or item, item
        if not name or not reference:
            raise SpecError(f"--model {item!r}: expected REF or NAME=REF")
        if name in models or name in REFERENCE_METHODS:
            raise SpecError(f"--model {item!r}: the name {name!r} is taken; give NAME=REF")
        models[name] = str(Path(reference).expanduser().absolute()) if looks_like_path(reference) else reference
    return models


def evaluate(spec: JobSpec, models: dict[str, str] | None = None, out_dir: str | os.PathLike | None = None,
             address: str | None = None, log: Callable[[str], None] = print) -> EvalOutcome:
    """Evaluate the spec's reference models and ``models`` ({name: reference}); write and rank the rows."""
    from orchestrator.api import init_ray, preflight, ray_fit
    from orchestrator.local_run import local_fit
    from orchestrator.model_sources import check_reference
    from orchestrator.prepare import prepare

    models = dict(models or {})
    preflight(spec)
    for name, reference in models.items():
        check_reference(reference, f"--model {name}")
    out = Path(out_dir or spec.run_dir or Path("runs") / f"{spec.name}-eval-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if (out / "evals").exists():
        raise SpecError(f"--out {out}: already holds an evals table; choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    on_ray = bool(address or spec.ray.address or os.environ.get("RAY_ADDRESS"))
    if on_ray:
        init_ray(spec, address, out)
    run_fit = ray_fit(out) if on_ray else local_fit(out / "logs")
    log(f"eval: the spec's reference models and {len(models)} more, {'a Ray gang' if on_ray else 'one local process'} each")
    prepared = prepare(spec, run_fit, log)
    rows = _evaluate_models(spec, prepared, models, run_fit, log)
    return _write_and_rank(spec, out, prepared, rows, log)


def _evaluate_models(spec: JobSpec, prepared, models: dict[str, str], run_fit, log) -> list[tuple[dict, str]]:
    """(evals row, evaluation JSON) per given model, evaluated (or read from the cache) in one gang."""
    import json

    from orchestrator.prepare import evaluated_row, evaluation_dir, evaluation_task

    outputs, tasks = {}, []
    for name, reference in models.items():
        outputs[name] = evaluation_dir(spec, prepared.data_hash, reference, prepared.retain_stats,
                                       prepared.benchmark) / "model.json"
        if not outputs[name].exists():
            log(f"eval: evaluating {name} ({reference})")
            tokenizer = spec.model.tokenizer or reference
            retain = Path(prepared.retain_stats) if prepared.retain_stats else None
            tasks.append(evaluation_task(spec, reference, tokenizer, retain, outputs[name], prepared.benchmark))
    if tasks:
        run_fit([tasks], spec.prepare.num_workers, spec.scaling.cpus_per_worker)
    rows = []
    for name, path in outputs.items():
        metrics = json.loads(path.read_text())["metrics"]
        rows.append((evaluated_row(metrics, EVALUATED_METHOD, name, prepared.target_model_utility), str(path)))
    return rows


def _write_and_rank(spec: JobSpec, out: Path, prepared, rows: list[tuple[dict, str]], log) -> EvalOutcome:
    from orchestrator.api import base_trial_config, reference_row, write_reference_rows
    from orchestrator.compare import compare_runs, format_table
    from orchestrator.results import copy_reference_samples, read_evals, read_samples, write_evals

    base = base_trial_config(spec, out, f"{spec.name}-eval-{uuid.uuid4().hex[:8]}", prepared)
    write_reference_rows(out, base, prepared)
    for row, evaluation in rows:
        write_evals(out, [reference_row(base, row)], row["trial_id"], 0)
        copy_reference_samples(evaluation, out, base["run_id"], row["trial_id"])
    comparison = compare_runs([str(out)], str(out), utility_ceiling=spec.utility_ceiling)
    log(format_table(comparison.ranked))
    summary = f"tables: {out / 'evals'} · ranking: {comparison.ranking_path} · report: {comparison.report_paths.get('html')}"
    log(summary)
    return EvalOutcome(out, read_evals(out), read_samples(out), comparison.ranked, summary)


def spec_for_model(reference: str, overrides: list[str]) -> JobSpec:
    """The spec ``unlearn eval MODEL`` scores with: that model as the target, the rest from ``--set``."""
    from orchestrator.spec import apply_overrides, parse_spec

    data = apply_overrides({"name": "eval", "model": {"target": reference}}, overrides)
    return parse_spec(data, f"<unlearn eval {reference}>")
