"""Every dashboard metric is created through ray.util.metrics for real and recorded in a Ray worker."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def _record_every_metric() -> dict:
    import logging

    from orchestrator import telemetry

    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    telemetry.logger.addHandler(Collect(level=logging.WARNING))
    errors = {}
    for name, info in telemetry.METRICS.items():
        try:
            telemetry.record(name, 1.0, {key: "x" for key in info.tag_keys})
        except Exception as err:  # noqa: BLE001 - the test reports which metric failed and why
            errors[name] = f"{type(err).__name__}: {err}"
    # and through the path trials use, with every kind of sample an epoch can carry (MGDA weights, PDU state)
    from orchestrator.steps import EpochStats

    stats = EpochStats(losses={"forget": 0.5}, weights={"forget": 0.3, "weight.forget": 0.2},
                       extras={"dual.lambda": 101.0}, tokens=8, seconds=2.0)
    telemetry.TrialTelemetry("run", "mollm_1", "mollm").epoch(stats, {"status": "ok", "epoch": 1, "step": 2,
                                                                      "forget_quality": 0.1, "model_utility": 0.5,
                                                                      "utility_loss": 0.1, "eval_seconds": 1.0})
    telemetry.record_trial_statuses("run", ["running", "terminated"])
    return {"errors": errors, "warnings": warnings, "names": sorted(telemetry.METRICS)}


def test_every_metric_is_recorded_in_a_ray_worker_without_a_warning(ray_local):
    import ray

    result = ray.get(ray.remote(_record_every_metric).remote())
    assert len(result["names"]) >= 12
    assert result["errors"] == {}
    assert result["warnings"] == []
