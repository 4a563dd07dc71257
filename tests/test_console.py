"""The console rules: Ray's INFO lines off the console, warnings and everyone else's lines kept."""
from __future__ import annotations

import logging
import os

import ray
from ray._private.log import PlainRayHandler

from orchestrator.console import RayInfoOffConsole, quiet_ray_console

RAY_DIR = os.path.dirname(ray.__file__) + os.sep


def record(pathname: str, level: int) -> logging.LogRecord:
    return logging.LogRecord("x", level, pathname, 1, "message", None, None)


def test_ray_info_is_dropped_and_the_rest_kept():
    rule = RayInfoOffConsole(RAY_DIR)
    context_py = os.path.join(RAY_DIR, "train", "v2", "_internal", "execution", "context.py")
    assert not rule.filter(record(context_py, logging.INFO))  # "Reporting training result …"
    assert not rule.filter(record(context_py, logging.DEBUG))
    assert rule.filter(record(context_py, logging.WARNING))  # a failure or restart warning still shows
    assert rule.filter(record("/work/project/orchestrator/worker.py", logging.INFO))
    # a sibling directory whose name starts like Ray's is not Ray
    assert rule.filter(record(RAY_DIR.rstrip(os.sep) + "_tools/x.py", logging.INFO))


def test_quiet_ray_console_filters_the_root_console_handler_once(monkeypatch):
    console, other = PlainRayHandler(), logging.StreamHandler()
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [console, other])
    quiet_ray_console()
    quiet_ray_console()
    assert [type(f) for f in console.filters] == [RayInfoOffConsole]
    assert other.filters == []
