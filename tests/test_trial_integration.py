"""End to end: a 2-worker DeepSpeed ZeRO-2 trial inside a real local Ray, read back from Parquet."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from orchestrator.spec import parse_spec
from tests.conftest import tiny_spec

pytestmark = pytest.mark.integration


def test_ga_and_graddiff_trials_on_ray(ray_local, tiny_cache, tmp_path):
    from orchestrator.api import run
    from orchestrator.results import EVALS_SCHEMA

    spec = parse_spec(tiny_spec(tiny_cache, sweep={"methods": [
        {"name": "ga", "space": {"lr": {"grid": [1e-4]}, "epochs": {"grid": [2]}}},
        {"name": "graddiff", "space": {"lr": {"grid": [1e-4]}, "epochs": {"grid": [2]}}},
    ]}))
    result = run(spec, run_dir=tmp_path / "run", log=lambda line: None)

    files = sorted((tmp_path / "run" / "evals").glob("*.parquet"))
    table = pq.read_table(files[0]) if len(files) == 1 else result.evals
    assert set(EVALS_SCHEMA.names) <= set(table.column_names)
    rows = result.evals.to_pylist()
    methods = {row["method"] for row in rows}
    assert methods == {"target", "retain", "ga", "graddiff"}
    retain = next(r for r in rows if r["method"] == "retain")
    assert retain["forget_quality"] == pytest.approx(1.0)
    for method in ("ga", "graddiff"):
        trial_rows = sorted((r for r in rows if r["method"] == method), key=lambda r: r["epoch"])
        assert [r["epoch"] for r in trial_rows] == [1, 2]  # one row per evaluation, no duplicates
        assert trial_rows[-1]["status"] == "ok"
        assert trial_rows[-1]["num_workers"] == 2 and trial_rows[-1]["zero_stage"] == 2
        assert trial_rows[-1]["effective_batch"] == 2 * 4
        assert 0.0 <= trial_rows[-1]["forget_quality"] <= 1.0
    assert result.ranking is not None and result.ranking.num_rows >= 2
