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


def resume(run_dir, address=None, log=print):
    from orchestrator.api import resume as _resume

    return _resume(run_dir, address=address, log=log)


__all__ = ["JobSpec", "SpecError", "load_spec", "resume", "run"]
