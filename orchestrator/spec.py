"""The job spec: YAML → one validated pydantic model, before any Ray resource is taken.

Every error is one line naming the field (``SpecError``), and the CLI turns it into exit status 2.
YAML is read with ``yaml.safe_load`` only: a tag that would construct a Python object is refused.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from orchestrator.errors import SpecError
from orchestrator.spec_sweep import SweepSpec
from orchestrator.spec_sweep import Strict as _Strict

# Default (forget, retain, holdout) splits per benchmark kind. MUSE runs train and score on raw text;
# these are the only text splits its loader (data.load_muse) knows.
SPLIT_DEFAULTS = {"tofu": ("forget10", "retain90", "holdout10"), "muse": ("text_forget", "text_retain", "text_holdout")}
SPLIT_FIELDS = ("forget_split", "retain_split", "holdout_split")
# Method splits built from question/answer rows (template answers, ULD's paraphrase/distractor sets):
# a MUSE forget set is documents, so methods that read them cannot run on it.
QA_ONLY_SPLITS = ("template", "forget_augmented", "retain_augmented", "alternate")


class BenchmarkSpec(_Strict):
    # "tofu": question/answer splits (forget quality, model utility). "muse": raw text documents trained as
    # plain LM sequences, scored by VerbMem, KnowMem and privleak (data.load_muse; embedded: its text corpus).
    kind: Literal["tofu", "muse"] = "tofu"
    source: str = "embedded"  # "embedded", a local directory in TOFU's (or MUSE's) layout, or a hub dataset name
    forget_split: str | None = None  # default per kind: SPLIT_DEFAULTS
    retain_split: str | None = None
    holdout_split: str | None = None
    num_authors: int = Field(100, ge=2)  # embedded generator only
    questions_per_author: int = Field(8, ge=1)
    text_corpus: bool = True  # embedded: add biographies + question sets for the MUSE-style metrics

    @model_validator(mode="after")
    def _splits(self) -> "BenchmarkSpec":
        for field, default in zip(SPLIT_FIELDS, SPLIT_DEFAULTS[self.kind]):
            if getattr(self, field) is None:
                object.__setattr__(self, field, default)
        if self.kind == "muse":
            for field in SPLIT_FIELDS:
                if getattr(self, field) not in SPLIT_DEFAULTS["muse"]:
                    raise ValueError(f"{field}: kind muse reads the text splits {', '.join(SPLIT_DEFAULTS['muse'])}, "
                                     f"got {getattr(self, field)!r}")
            if self.source == "embedded" and not self.text_corpus:
                raise ValueError("text_corpus: kind muse on the embedded benchmark trains on its text corpus")
        return self


class EmbeddedModelSpec(_Strict):
    vocab_size: int = Field(1024, ge=64)
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(384, ge=8)


class ModelSpec(_Strict):
    # Each reference: a hub id, a local from_pretrained directory, a .gguf file, or a packaged model name
    # (model_sources.PACKAGED_MODELS, e.g. smollm2-135m-instruct); GGUF sources are converted once by prepare.
    target: str = "embedded"  # "embedded" (built and fine-tuned by prepare) or a model reference
    retain: str | None = None  # retain model for real benchmarks; embedded or base: trained by prepare
    tokenizer: str | None = None  # defaults to the target's (the base's)
    # A pretrained model prepare fine-tunes, as TOFU was built: target = base + the benchmark's `full`
    # split, retain = base + the retain split; the utility sets are not trained on. Excludes target/retain.
    base: str | None = None
    # A name in templates.PROMPT_TEMPLATES or a format string with {question}; must be the one the target
    # was fine-tuned with. Default: "embedded" for the embedded target, a packaged base's chat format, else
    # "qa" (TOFU's phi format).
    prompt_template: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    embedded: EmbeddedModelSpec = EmbeddedModelSpec()

    @model_validator(mode="after")
    def _template(self) -> "ModelSpec":
        from orchestrator.model_sources import PACKAGED_MODELS
        from orchestrator.templates import resolve_template

        if self.base is not None:
            for field in ("target", "retain"):
                if field in self.model_fields_set:
                    raise ValueError(f"{field}: model.base is fine-tuned into the target and retain models by "
                                     f"prepare; leave model.{field} out")
        if self.prompt_template is None:
            packaged = PACKAGED_MODELS.get(self.base or "")
            default = packaged.prompt_template if packaged else "embedded" if self.uses_embedded_model else "qa"
            object.__setattr__(self, "prompt_template", default)
        try:
            resolve_template(self.prompt_template)
        except ValueError as err:
            raise ValueError(f"prompt_template: {err}") from None
        return self

    @property
    def uses_embedded_model(self) -> bool:
        """The small Llama prepare builds from a config (no base, target "embedded")."""
        return self.base is None and self.target == "embedded"


class PrepareSpec(_Strict):
    epochs: int = Field(40, ge=1)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    cache_dir: str = ".cache/unlearn"
    num_workers: int = Field(2, ge=1)  # the gang that evaluates target and retain (sharded)
    # Also train on (question → paraphrased answer), so the fact rather than one sentence is learned and
    # the truth ratio (paraphrased vs perturbed answers) can tell the target from the retain model.
    paraphrase_augmentation: bool = True
    # With model.base: also train on the base model's own greedy answers to general questions
    # (assets/rehearsal_questions.txt, none about a utility set's subjects), so the fine-tunes keep the
    # base's way of answering questions that are not about the authors.
    self_rehearsal: bool = False


class LoraSpec(_Strict):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None  # None: every linear layer but lm_head


class TrainingSpec(_Strict):
    lr: float = Field(1e-5, gt=0)
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(8, ge=1)  # per worker, per micro-step
    grad_accum: int = Field(1, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    max_length: int = Field(128, ge=8)
    gradient_checkpointing: bool = False
    lora: LoraSpec | None = None
    # Training forwards (a method's policy and reference forwards, prepare's fine-tunes) under
    # torch.autocast in bfloat16; weights, gradients and optimizer states stay float32 (model.dtype) and
    # evaluation runs in model.dtype. Only on devices with native bf16 matmuls (models.training_autocast):
    # elsewhere the forwards run in model.dtype, as bf16 there is ~18x slower than float32.
    autocast: Literal["bfloat16"] | None = None


class ScalingSpec(_Strict):
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.99, gt=0)
    # Intra-op threads per worker. 1 by default: on small models and shared vCPUs, 2 OpenMP threads per
    # process measured 2.4× slower than 1 (thread-barrier overhead), so use more workers instead.
    threads_per_worker: int = Field(1, ge=1)
    use_gpu: bool = False
    zero_stage: int = Field(2, ge=0, le=3)
    offload: bool = False  # ZeRO-3 parameter/optimizer offload to CPU
    max_failures: int = Field(2, ge=0)  # worker crashes a trial survives (restarts from its checkpoint)
    # Per-epoch checkpoints a trial keeps on disk, newest first (restarts and resume need only the newest;
    # a 7B ZeRO checkpoint with Adam states is ~100 GB).
    checkpoints_to_keep: int = Field(2, ge=1)
    # How a trial's workers are laid over the nodes (Ray placement-group strategies): PACK fills a node
    # first, SPREAD prefers distinct nodes, STRICT_SPREAD requires one node per worker (a gang that cannot
    # be placed that way waits), STRICT_PACK requires one node for the whole gang.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Keep every trial's driver (Tune's trial actor and Ray Train's controller beside it) on the head node,
    # so losing a worker node costs a gang restart, never the trial itself.
    drivers_on_head: bool = True


class EvaluationSpec(_Strict):
    every: int = Field(1, ge=0)  # evaluate every k epochs (0: only after the last epoch)
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(200, ge=1)
    mink_k: float = Field(0.4, gt=0, le=1)
    retain_eval_size: int | None = Field(None, ge=1)
    generation: bool = True
    # Score TOFU's real-authors and world-facts sets (model utility needs them); false when the data has none.
    utility_sets: bool = True
    # "ratio" (TOFU) or "prob_mean" (P_c/(P_c + P_w), open-unlearning #163): changes the truth-ratio metrics
    # and forget quality; each evals row records which produced it.
    truth_ratio_aggregator: Literal["ratio", "prob_mean"] = "ratio"
    # GradNorm membership inference: a forward and backward per forget/holdout example.
    gradnorm: bool = True
    # Tokens of a teacher-forced prompt + answer in evaluation (the reference evaluator's 512), independent of
    # training.max_length.
    max_length: int = Field(512, ge=8)
    verbmem_prefix_tokens: int = Field(32, ge=1)
    verbmem_new_tokens: int = Field(128, ge=1)
    knowmem_new_tokens: int = Field(32, ge=1)
    # ZeRO-3: gather each model's whole weights once per evaluation instead of layer by layer at every
    # generated token (every rank then holds a full copy while it evaluates; false when one cannot).
    gather_weights: bool = True


class RobustnessSpec(_Strict):
    """Attacks on each trial's chosen checkpoint, run in the trial's gang after its last epoch; each adds an
    evals row with ``probe`` set (METHODS.md, "Robustness probes"). Off by default: each costs an evaluation."""

    # relearn: fine-tune on part of the forget set, score the rest; int8 / int4: round-to-nearest weights
    probes: list[Literal["relearn", "int8", "int4"]] = []
    # "best": the epoch the comparison represents the trial by (best under the utility ceiling);
    # "every": every evaluated epoch
    epochs: Literal["best", "every"] = "best"
    relearn_fraction: float = Field(0.1, gt=0, lt=1)  # share of forget pairs the attacker trains on (≥ 1)
    relearn_epochs: int = Field(3, ge=1)
    relearn_lr: float | None = Field(None, gt=0)  # None: the trial's own learning rate
    # "full": the usual suite after each attack; "forget": the forget side only (forget and holdout splits:
    # FQ, forget prob / ROUGE / truth ratio, MIAs, privleak), about a third of an evaluation, no utility.
    suite: Literal["full", "forget"] = "full"

    @model_validator(mode="after")
    def _unique(self) -> "RobustnessSpec":
        if len(set(self.probes)) != len(self.probes):
            raise ValueError(f"probes: listed twice: {self.probes}")
        return self


class RaySpec(_Strict):
    address: str | None = None  # None: start a local cluster (or join RAY_ADDRESS)
    num_cpus: int | None = Field(None, ge=1)  # local cluster size
    dashboard_host: str = "127.0.0.1"  # never exposed beyond loopback unless asked
    metrics_export_port: int | None = Field(None, ge=1024, le=65535)  # local cluster's Prometheus port (None: Ray picks)


class TrackingSpec(_Strict):
    """Optional experiment tracking, as Tune callbacks (the [tracking] extra)."""

    tensorboard: bool = False  # TensorBoard event files per trial under <run_dir>/tune
    mlflow: bool = False  # one MLflow run per trial
    mlflow_tracking_uri: str | None = None  # default: sqlite:///<run_dir>/mlflow.db

    @model_validator(mode="after")
    def _check(self) -> "TrackingSpec":
        import importlib.util

        if self.mlflow_tracking_uri and not self.mlflow:
            raise ValueError("mlflow_tracking_uri: needs tracking.mlflow: true")
        for field, package in (("mlflow", "mlflow"), ("tensorboard", "tensorboardX")):
            if getattr(self, field) and importlib.util.find_spec(package) is None:
                raise ValueError(f"{field}: needs the {package} package: pip install -e '.[tracking]'")
        return self


class JobSpec(_Strict):
    name: str = "unlearn"
    seed: int = 0
    run_dir: str | None = None  # default runs/<name>-<timestamp>
    benchmark: BenchmarkSpec = BenchmarkSpec()
    model: ModelSpec = ModelSpec()
    prepare: PrepareSpec = PrepareSpec()
    training: TrainingSpec = TrainingSpec()
    scaling: ScalingSpec = ScalingSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    sweep: SweepSpec | None = None  # what `unlearn run` searches; `unlearn eval` needs none
    ray: RaySpec = RaySpec()
    tracking: TrackingSpec = TrackingSpec()
    robustness: RobustnessSpec = RobustnessSpec()
    utility_ceiling: float = Field(0.10, gt=0)  # comparison: best epoch per trial under this utility loss

    @model_validator(mode="after")
    def _check(self) -> "JobSpec":
        if self.sweep is None:  # scoring only (unlearn eval)
            self._resolve_paths()
            return self
        if self.sweep.multi_objective and self.sweep.search != "optuna":
            raise ValueError("sweep.multi_objective: needs sweep.search: optuna")
        if self.sweep.multi_objective and self.sweep.scheduler == "asha":
            raise ValueError("sweep.scheduler: asha needs one scalar metric, not sweep.multi_objective")
        if self.scaling.offload and self.scaling.zero_stage != 3:
            raise ValueError("scaling.offload: needs scaling.zero_stage: 3")
        if self.prepare.self_rehearsal and not self.model.base:
            raise ValueError("prepare.self_rehearsal: needs model.base (the model whose own answers are rehearsed)")
        if self.benchmark.kind == "muse":
            self._check_muse()
        self._check_metric_is_measured()
        self._resolve_paths()
        return self

    def _resolve_paths(self) -> None:
        """Every path in the spec made absolute once, relative to the directory the command runs in, so
        Ray workers (which run elsewhere) and `unlearn resume` (which reads the saved spec) see the same files.
        A model or data reference counts as a path when it looks like one or exists there; else it stays a
        hub id (or a name such as ``embedded``)."""
        for section, field in (("benchmark", "source"), ("model", "target"), ("model", "retain"),
                               ("model", "tokenizer"), ("model", "base")):
            owner = getattr(self, section)
            value = getattr(owner, field)
            if value and value != "embedded" and looks_like_path(value):
                object.__setattr__(owner, field, absolute(value))
        object.__setattr__(self.prepare, "cache_dir", absolute(self.prepare.cache_dir))
        if self.run_dir:
            object.__setattr__(self, "run_dir", absolute(self.run_dir))

    def has_retain_model(self) -> bool:
        """A retain model exists: prepare trains one (embedded target, or model.base) or the spec names one."""
        return self.model.target == "embedded" or self.model.base is not None or self.model.retain is not None

    def forget_axis(self) -> str:
        """What the sweep's score and the ranking take as forgetting (scores.forget_axis)."""
        from orchestrator.scores import forget_axis

        return forget_axis(self.benchmark.kind, self.benchmark.kind == "tofu" and self.has_retain_model())

    def _check_metric_is_measured(self) -> None:
        """Refuse a sweep whose metric no trial could measure: Tune would optimise nothing."""
        sweep = self.sweep
        needs_fq = sweep.metric == "log10_forget_quality" or sweep.multi_objective
        if needs_fq and self.forget_axis() == "forget_prob":
            field = "sweep.multi_objective" if sweep.multi_objective else "sweep.metric"
            raise ValueError(f"{field}: searches on log10 forget quality, which needs a retain model "
                             "(model.retain); without one use sweep.metric score (forget probability) or model_utility")
        needs_utility = sweep.metric in ("score", "model_utility") or sweep.multi_objective
        for field, on, why in (("generation", self.evaluation.generation, "greedy answers"),
                               ("utility_sets", self.evaluation.utility_sets or self.benchmark.kind == "muse",
                                "the real-authors and world-facts scores")):
            if needs_utility and not on:
                raise ValueError(f"evaluation.{field}: false leaves model utility unmeasured (it needs {why}), which "
                                 f"sweep.metric {sweep.metric!r} needs; turn it on or use log10_forget_quality")

    def _check_muse(self) -> None:
        """MUSE has no truth ratios (no forget quality) and its forget set is documents, not questions."""
        from methods import describe

        if self.sweep.metric == "log10_forget_quality":
            raise ValueError("sweep.metric: benchmark.kind muse has no forget quality; use score or model_utility")
        if self.sweep.multi_objective:
            raise ValueError("sweep.multi_objective: searches on log10 forget quality, which benchmark.kind muse lacks")
        for i, entry in enumerate(self.sweep.methods):
            needs = [split for split in describe(entry.name).splits if split in QA_ONLY_SPLITS]
            if needs:
                raise ValueError(f"sweep.methods[{i}].name: method {entry.name!r} needs question/answer rows "
                                 f"(splits {', '.join(needs)}); benchmark.kind muse trains on text documents")

    def spec_hash(self) -> str:
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def looks_like_path(reference: str) -> bool:
    """A path rather than a hub id: written as one (./, ../, /, ~) or existing relative to the working directory."""
    return reference.startswith((".", "/", "~")) or Path(reference).expanduser().exists()


def absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    # Model-level validators name the sub-field they reject as "sub.field: message".
    sub = re.match(r"^([A-Za-z_][\w.\[\]]*): (.+)$", message)
    if sub:
        location = f"{location}.{sub.group(1)}" if location else sub.group(1)
        message = sub.group(2)
    return f"field '{location}': {message}" if location else message


def parse_spec(data: Any, source: str = "<spec>") -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the spec must be a YAML mapping")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{source}: {_format_error(err)}") from None
    except ValueError as err:  # raised by validators outside pydantic's wrapping
        raise SpecError(f"{source}: {str(err).splitlines()[0]}") from None


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"{path}: not valid UTF-8 at byte {err.start}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"{where}: invalid YAML: {problem}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``--set a.b=value``: value parsed with yaml.safe_load (numbers, booleans, lists)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {item!r}: expected key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"--set {key}: {part!r} is not a mapping")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise SpecError(f"--set {key}: value is not valid YAML") from None
    return data


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    data = read_yaml(path)
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, overrides)
    return parse_spec(data, str(path))
