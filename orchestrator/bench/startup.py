"""P7 start-up: what a user waits for before the first number — the CLI refusing bad input, and
``unlearn eval`` from process start to its table written — each in a fresh process beside its baseline."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from orchestrator.bench.sizes import Bench, bench_spec
from orchestrator.bench.table import BenchRow, measured
from orchestrator.measure import median_seconds
from orchestrator.provenance import PROJECT_ROOT

VALIDATE_REPEATS = 5


def cli_seconds(arguments: list[str], expected_status: int, repeats: int) -> float:
    """Median wall time of ``python -m orchestrator ARGUMENTS`` in fresh processes; a different exit status
    than expected fails the section (a timing of the wrong path would mean nothing)."""
    def once() -> None:
        done = subprocess.run([sys.executable, "-m", "orchestrator", *arguments], cwd=PROJECT_ROOT,
                              capture_output=True, text=True)
        if done.returncode != expected_status:
            last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [""]
            raise RuntimeError(f"unlearn {arguments[0]} exited {done.returncode}, expected {expected_status}: {last[0]}")

    return median_seconds(once, repeats)[0]


def python_seconds(code: str, repeats: int) -> float:
    return median_seconds(lambda: subprocess.run([sys.executable, "-c", code], check=True), repeats)[0]


def measure_bad_input(bench: Bench) -> list[BenchRow]:
    """``unlearn validate`` on a spec naming an unknown method (exit 2) and ``unlearn methods`` (exit 0),
    against a process that only imports torch: refusing bad input must not cost a torch import."""
    bad = bench_spec(bench.size, bench.spec.prepare.cache_dir, methods=[{"name": "no_such_method"}])
    path = bench.work / "bad_spec.yaml"
    path.write_text(yaml.safe_dump(bad))
    bench.log(f"P7: unlearn validate on a bad spec, unlearn methods, python -c 'import torch' × {VALIDATE_REPEATS}")
    torch_import = python_seconds("import torch", VALIDATE_REPEATS)
    return [
        measured("P7 start-up", "unlearn validate, bad spec → exit 2 (wall s, fresh process)",
                 cli_seconds(["validate", str(path)], 2, VALIDATE_REPEATS), "s", "python -c 'import torch'",
                 torch_import),
        measured("P7 start-up", "unlearn methods (wall s, fresh process)", cli_seconds(["methods"], 0, VALIDATE_REPEATS),
                 "s", "python -c 'import torch'", torch_import),
    ]


def measure_eval_command(bench: Bench, suite_seconds: float) -> list[BenchRow]:
    """``unlearn eval SPEC --model bench=COPY`` end to end (process start → evals table, ranking and report
    written) vs the evaluation suite alone on the same model and data (P4's batched median). The model is a
    fresh copy of the prepared target, so the evaluation cache (keyed on the model's files) cannot answer."""
    spec_path, out = bench.work / "eval_spec.yaml", bench.work / "eval_out"
    spec_path.write_text(yaml.safe_dump(bench_spec(bench.size, bench.spec.prepare.cache_dir)))
    model = bench.work / "eval_model"
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(bench.prepared.model_path, model)
    bench.log("P7: unlearn eval end to end (one local evaluation process)")
    seconds = cli_seconds(["eval", str(spec_path), "--model", f"bench={model}", "--out", str(out)], 0, 1)
    if not any(Path(out, "evals").glob("*.parquet")):
        raise RuntimeError(f"unlearn eval wrote no evals table under {out}")
    return [measured("P7 start-up", "unlearn eval, process start → tables written (one model)", seconds, "s",
                     "evaluation suite alone (P4 batched)", suite_seconds)]
