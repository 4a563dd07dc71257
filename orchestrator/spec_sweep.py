"""The sweep section of a job spec: which methods, their fixed hyperparameters and search spaces, and how
Tune searches them. Validated like the rest of the spec (one line naming the field), without torch."""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TRAINER_KEYS = ("lr", "epochs", "weight_decay")
SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


class Strict(BaseModel):
    # allow_inf_nan=False: `lr: .inf` passed `gt=0` and reached the optimizer.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class MethodEntry(Strict):
    name: str
    params: dict[str, Any] = {}  # fixed hyperparameters
    space: dict[str, dict[str, Any]] | None = None  # overrides the method's default search space

    @model_validator(mode="after")
    def _check(self) -> "MethodEntry":
        from methods import describe

        known = set(describe(self.name).params) | set(TRAINER_KEYS)
        for key, value in self.params.items():
            if key not in known:
                raise ValueError(f"params.{key}: method {self.name!r} has no such hyperparameter; known: {sorted(known)}")
            if key in TRAINER_KEYS:
                check_trainer_value(f"params.{key}", key, value)
        if self.space is not None:
            if not self.space:
                raise ValueError("space: empty search space (omit it to use the method's default)")
            for key, dist in self.space.items():
                if key not in known:
                    raise ValueError(f"space.{key}: method {self.name!r} has no such hyperparameter; known: {sorted(known)}")
                check_distribution(f"space.{key}", dist)
        return self


def check_distribution(where: str, dist: Any) -> None:
    if not isinstance(dist, dict) or len(dist) != 1:
        raise ValueError(f"{where}: must be one of {{{', '.join(SPACE_KINDS)}: ...}}")
    (kind, values), = dist.items()
    if kind not in SPACE_KINDS:
        raise ValueError(f"{where}: unknown distribution {kind!r}; known: {', '.join(SPACE_KINDS)}")
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}.{kind}: needs a non-empty list")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or not values[0] < values[1]:
            raise ValueError(f"{where}.{kind}: needs [low, high] numbers with low < high")
        if kind == "loguniform" and values[0] <= 0:
            raise ValueError(f"{where}.loguniform: low must be > 0")
    key = where.rsplit(".", 1)[-1]
    if key in TRAINER_KEYS:
        if key == "epochs" and kind in ("uniform", "loguniform"):
            raise ValueError(f"{where}: epochs needs grid, choice or randint values")
        for value in values:
            check_trainer_value(where, key, value)


def check_trainer_value(where: str, key: str, value: Any) -> None:
    """A trainer setting fixed or swept per method obeys the bounds of the ``training`` section
    (a ``params: {lr: 0}`` or ``epochs: {grid: [0]}`` used to pass and reach the optimizer)."""
    if key == "epochs":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: epochs must be an integer >= 1, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {key} must be a finite number, got {value!r}")
    if key == "lr" and value <= 0:
        raise ValueError(f"{where}: learning rates must be positive and finite")
    if key == "weight_decay" and value < 0:
        raise ValueError(f"{where}: weight_decay must be >= 0, got {value!r}")


class SweepSpec(Strict):
    methods: list[MethodEntry] = Field(min_length=1)
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1)  # grid: repeats of the grid; random/optuna: trials (per method for random)
    max_concurrent: int | None = Field(None, ge=1)  # default: as many gangs as the cluster fits at once
    scheduler: Literal["fifo", "asha"] = "fifo"
    metric: Literal["score", "log10_forget_quality", "model_utility"] = "score"
    utility_weight: float = Field(10.0, ge=0)  # score = log10(FQ) − utility_weight · max(0, utility loss)
    multi_objective: bool = False  # optuna only: Pareto search on (log10 FQ ↑, utility loss ↓)
    grace_period: int = Field(1, ge=1)  # ASHA: epochs before a trial can be stopped
    reduction_factor: float = Field(2.0, gt=1)
