"""Unlearning orchestrator: Ray Tune sweeps of Ray Train + DeepSpeed unlearning trials.

    from orchestrator import load_spec, run
    result = run(load_spec("jobs/quickstart.yaml"))
"""
from orchestrator.errors import SpecError
from orchestrator.spec import JobSpec, load_spec


def run(spec, run_dir=None, address=None, overrides=None, log=print):
    """Validate, prepare, sweep and compare (see orchestrator.api.run)."""
    from orchestrator.api import run as _run

    return _run(spec, run_dir=run_dir, address=address, overrides=overrides, log=log)


def evaluate(spec, models=None, out_dir=None, address=None, log=print):
    """Score the spec's reference models and ``models`` ({name: reference}) without training
    (see orchestrator.eval_job.evaluate)."""
    from orchestrator.eval_job import evaluate as _evaluate

    return _evaluate(spec, models=models, out_dir=out_dir, address=address, log=log)


def resume(run_dir, address=None, log=print):
    from orchestrator.api import resume as _resume

    return _resume(run_dir, address=address, log=log)


__all__ = ["JobSpec", "SpecError", "evaluate", "load_spec", "resume", "run"]
