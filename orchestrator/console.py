"""What a user watches: Tune's progress table and one line per epoch; everything else goes to the logs.

Ray forwards every worker's stdout/stderr to the driver's console. Ray Train's own INFO lines (each
report's metrics dict, each checkpoint, each worker-group start), transformers' progress bars and
rouge-score's notices would bury the epoch lines there; they stay in Ray's log files instead.
"""
from __future__ import annotations

import logging
import os

# Ray Train's console level (RunConfig's LoggingConfig): its log files under the Ray session keep every level.
TRAIN_CONSOLE_LEVEL = "WARNING"


class RayInfoOffConsole(logging.Filter):
    """Drops Ray's INFO records on the console. Needed beside LoggingConfig: the logger that prints every
    report is named by its file path (Ray 2.60), so Ray Train's filter by logger name misses it. Ray Train's
    application log file, another handler of the same logger, still receives them."""

    def __init__(self, ray_dir: str) -> None:
        super().__init__()
        self.ray_dir = ray_dir

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.ray_dir)


def quiet_ray_console() -> None:
    """In a Ray Train worker: Ray's INFO records off the console handlers of the root logger."""
    import ray
    from ray._private.log import PlainRayHandler

    ray_dir = os.path.dirname(ray.__file__) + os.sep
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PlainRayHandler) and not any(isinstance(f, RayInfoOffConsole) for f in handler.filters):
            handler.addFilter(RayInfoOffConsole(ray_dir))


def quiet_libraries() -> None:
    """No per-load progress bars (transformers) or per-scorer notices (rouge-score, through absl); warnings
    still show."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("absl").setLevel(logging.WARNING)
