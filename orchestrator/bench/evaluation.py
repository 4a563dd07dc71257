"""P4: the batched evaluation suite vs the one-at-a-time reference on the same model and data."""
from __future__ import annotations

from pathlib import Path

from orchestrator.bench.sizes import Bench
from orchestrator.bench.table import BenchRow, measured
from orchestrator.local_run import THREADS
from orchestrator.measure import median_seconds


def measure_evaluation(bench: Bench) -> list[BenchRow]:
    """P4: the batched, sharding-ready suite vs the one-at-a-time reference, same model and data."""
    import torch

    from orchestrator.data import load_benchmark
    from orchestrator.evaluation.scorer import ModelScorer
    from orchestrator.evaluation.suite import (
        ReferenceStats,
        evaluate,
        evaluate_per_sample,
    )
    from orchestrator.models import load_model, load_tokenizer
    from orchestrator.results import METRIC_COLUMNS
    from orchestrator.evaluation.config import eval_config

    base = bench.base_config()
    torch.set_num_threads(THREADS)
    model = load_model(bench.prepared.model_path).eval()
    tokenizer = load_tokenizer(bench.prepared.tokenizer_path)
    data = load_benchmark(base["benchmark"]["source"], **base["benchmark"]["generator"])
    b = base["benchmark"]
    arguments = dict(forget_split=b["forget_split"], retain_split=b["retain_split"], holdout_split=b["holdout_split"],
                     retain_reference=ReferenceStats.from_json(Path(bench.prepared.retain_stats).read_text()),
                     target_model_utility=bench.prepared.target_model_utility)
    scorer, config = ModelScorer(model), eval_config(base)
    with torch.no_grad():
        bench.log(f"P4: evaluate (batched) × {bench.size.eval_repeats}")
        batched_seconds, batched = median_seconds(lambda: evaluate(scorer, tokenizer, data, config, **arguments),
                                                  bench.size.eval_repeats)
        bench.log(f"P4: evaluate_per_sample × {bench.size.per_sample_repeats}")
        single_seconds, single = median_seconds(lambda: evaluate_per_sample(scorer, tokenizer, data, config, **arguments),
                                                bench.size.per_sample_repeats)
    compared = [m for m in METRIC_COLUMNS if batched.metrics.get(m) is not None and single.metrics.get(m) is not None]
    missing = [m for m in METRIC_COLUMNS if (batched.metrics.get(m) is None) != (single.metrics.get(m) is None)]
    difference = max((abs(batched.metrics[m] - single.metrics[m]) for m in compared), default=0.0)
    agree = "agree" if difference <= 1e-4 and not missing else "DISAGREE"
    return [
        measured("P4 evaluation", "full suite seconds, evaluate (batched)", batched_seconds, "s",
                 "evaluate_per_sample", single_seconds),
        measured("P4 evaluation", f"aggregates {agree}: max |Δ| over {len(compared)} metrics"
                 + (f", {len(missing)} computed by one side only" if missing else ""), difference, "abs. difference"),
    ]
