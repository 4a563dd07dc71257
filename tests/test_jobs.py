"""Every job spec in jobs/ is schema-valid as written, names known templates and methods; the GPU specs
give the workers the settings their comments promise (as the worker's config and DeepSpeed read them) and
pass `unlearn validate` against a fake hub holding what those models and datasets really are. No network."""
from __future__ import annotations

import re
import types
from pathlib import Path

import pytest

from methods import method_names
from orchestrator.templates import PROMPT_TEMPLATES, resolve_template
from orchestrator.spec import JobSpec, SpecError, load_spec, parse_spec, read_yaml
from orchestrator.sweep import gang_fits, grid_configs
from tests.conftest import deepspeed_reads

JOBS_DIR = Path(__file__).resolve().parent.parent / "jobs"
JOBS = sorted(JOBS_DIR.glob("*.yaml"))
GPU_JOBS = {"tofu_llama2_forget01.yaml", "tofu_llama2_forget05.yaml", "tofu_llama2_forget10.yaml",
            "tofu_llama32_1b_forget10.yaml", "muse_news.yaml"}
# Fields a job already uses that the schema does not have yet (the lead adds them). While missing, the
# spec must be refused for exactly that field and parse without it; once added, it must parse whole.
PROPOSED_FIELDS: dict[str, list[str]] = {}


def schema_has(dotted: str) -> bool:
    model = JobSpec
    for part in dotted.split("."):
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return False
        model = field.annotation
    return True


def drop(data: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node[part]
    del node[leaf]


def load_job(path: Path) -> JobSpec:
    pending = [field for field in PROPOSED_FIELDS.get(path.name, []) if not schema_has(field)]
    if not pending:
        return load_spec(path)
    with pytest.raises(SpecError, match=rf"field '{re.escape(pending[0])}': unknown field"):
        load_spec(path)
    data = read_yaml(path)
    for field in pending:
        drop(data, field)
    return parse_spec(data, str(path))


def test_the_gpu_jobs_exist():
    assert GPU_JOBS <= {path.name for path in JOBS}


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_starts_with_the_command_that_runs_it(path):
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert re.fullmatch(rf"# (ray job submit --working-dir \. -- )?unlearn run jobs/{re.escape(path.name)}\b.*", first_line), first_line


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_is_schema_valid_with_known_template_and_methods(path):
    spec = load_job(path)
    assert spec.model.prompt_template in PROMPT_TEMPLATES
    for index, entry in enumerate(spec.sweep.methods):
        assert entry.name in method_names()
        if spec.sweep.search == "grid":
            assert grid_configs(entry, f"sweep.methods[{index}]")  # expands without a SweepError


def worker_view(spec: JobSpec, monkeypatch) -> tuple[dict, object]:
    """The base config every trial worker of this job receives (a real target: prepare passes its path
    through), and DeepSpeed's reading of the engine config the worker builds from it for the whole gang."""
    from orchestrator import api
    from orchestrator.prepare import Prepared
    from orchestrator.zero import deepspeed_config

    monkeypatch.setattr(api, "provenance", lambda: {"git_sha": "x", "versions": "{}"})
    base = api.base_trial_config(spec, Path("/tmp/run"), "run", Prepared(spec.model.target, spec.model.target,
                                                                         None, None, [], 0.0))
    training, scaling = base["training"], base["scaling"]
    engine = deepspeed_config(scaling["zero_stage"], training["batch_size"], training["grad_accum"],
                              scaling["num_workers"], base["model"]["dtype"], scaling["offload"],
                              training["max_grad_norm"])
    return base, deepspeed_reads(engine, scaling["num_workers"], monkeypatch)


@pytest.mark.parametrize("percent", ["01", "05", "10"])
def test_tofu_llama2_jobs_give_the_workers_the_paper_setup(percent, monkeypatch):
    from orchestrator.data.tofu import TOFU_CONFIGS
    from orchestrator.prepare import benchmark_config
    from orchestrator.evaluation.config import eval_config

    spec = load_job(JOBS_DIR / f"tofu_llama2_forget{percent}.yaml")
    retain = f"{100 - int(percent)}"
    # The hub configs the workers load: forget and holdout of one size, the retain set that complements it.
    splits = benchmark_config(spec)["generator"]["splits"]
    assert [TOFU_CONFIGS[split] for split in splits] == [
        f"forget{percent}_perturbed", f"retain{retain}", f"holdout{percent}", "retain_perturbed",
        "real_authors_perturbed", "world_facts_perturbed"]
    assert spec.model.retain.endswith(f"_{spec.benchmark.retain_split}")  # fine-tuned on exactly that split
    # Llama-2-chat's prompt, as the worker renders a question (what TOFU fine-tuned the target with).
    base, engine = worker_view(spec, monkeypatch)
    assert resolve_template(base["model"]["prompt_template"]).format(question="Who wrote it?") == (
        "[INST] Who wrote it? [/INST]")
    # DeepSpeed, for the 8-rank gang: TOFU's effective batch of 32, bf16, ZeRO-3 (it refuses a batch that
    # does not add up); gradient checkpointing on; TOFU's 200-token generations for ROUGE.
    assert engine.train_batch_size == 32 and engine.bfloat16_config.enabled and engine.zero_optimization_stage == 3
    assert base["training"]["gradient_checkpointing"] and eval_config(base).max_new_tokens == 200


def test_tofu_llama2_jobs_differ_only_in_the_split():
    texts = {p: (JOBS_DIR / f"tofu_llama2_forget{p}.yaml").read_text(encoding="utf-8") for p in ("01", "05", "10")}

    def normalised(text: str) -> list[str]:
        # Drop the lines that name the split (or describe its size); everything else must be identical.
        return [line for line in text.splitlines() if not re.search(r"forget\d\d|retain\d\d|holdout\d\d", line)]

    assert normalised(texts["01"]) == normalised(texts["05"]) == normalised(texts["10"])


def test_gpu_jobs_fit_the_node_they_are_written_for():
    # (job, CPUs and GPUs of the node its comments assume): a trial must be schedulable there.
    nodes = {"tofu_llama2_forget10.yaml": (32, 8), "muse_news.yaml": (32, 8), "tofu_llama32_1b_forget10.yaml": (32, 8)}
    for name, (cpus, gpus) in nodes.items():
        assert gang_fits(load_job(JOBS_DIR / name), cpus, gpus) >= 1, name
    assert gang_fits(load_job(JOBS_DIR / "tofu_llama32_1b_forget10.yaml"), 32, 8) == 2  # two 4-GPU gangs per node


def test_llama32_job_pairs_open_unlearning_models_and_their_chat_format(monkeypatch):
    spec = load_job(JOBS_DIR / "tofu_llama32_1b_forget10.yaml")
    # One open-unlearning recipe, fine-tuned on TOFU's `full` (target) and on the job's retain split (retain).
    assert spec.model.target.removesuffix("_full") == spec.model.retain.removesuffix(f"_{spec.benchmark.retain_split}")
    base, engine = worker_view(spec, monkeypatch)
    # open-unlearning's Llama-3.2 chat format, system turn included, as the worker renders a question.
    assert resolve_template(base["model"]["prompt_template"]).format(question="Who wrote it?") == (
        "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 10 Apr 2025\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWho wrote it?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert engine.train_batch_size == 32 and engine.bfloat16_config.enabled  # TOFU's effective batch, 4-rank gangs


def test_muse_job_reads_the_muse_news_corpus(monkeypatch):
    from orchestrator.data.muse import MUSE_HUB_SPLITS
    from orchestrator.prepare import benchmark_config

    spec = load_job(JOBS_DIR / "muse_news.yaml")
    bench = benchmark_config(spec)
    assert bench["kind"] == "muse" and bench["generator"] == {"kind": "muse"}  # every split load_muse knows
    # What the workers train and score on, as (config, split) of the hub dataset.
    b = spec.benchmark
    assert [MUSE_HUB_SPLITS[name] for name in (b.forget_split, b.retain_split, b.holdout_split)] == [
        ("raw", "forget"), ("raw", "retain1"), ("raw", "holdout")]
    # MUSE's target and retrained model of the same corpus as the data (MUSE-News → MUSE-news_*).
    corpus = b.source.removeprefix("muse-bench/MUSE-").lower()
    assert (spec.model.target, spec.model.retain) == (f"muse-bench/MUSE-{corpus}_target", f"muse-bench/MUSE-{corpus}_retrain")


# ---------------------------------------------------------------- `unlearn validate` against the hub
# What the Hugging Face hub serves for the GPU jobs (from the model and dataset cards): model repos, TOFU's
# configs, and MUSE-News's (config, split) pairs. Nothing else exists on this fake hub.
HUB_MODELS = {
    "locuslab/tofu_ft_llama2-7b",
    *(f"open-unlearning/tofu_Llama-2-7b-chat-hf_retain{r}" for r in (90, 95, 99)),
    "open-unlearning/tofu_Llama-3.2-1B-Instruct_full", "open-unlearning/tofu_Llama-3.2-1B-Instruct_retain90",
    "muse-bench/MUSE-news_target", "muse-bench/MUSE-news_retrain", "meta-llama/Llama-2-7b-hf",
}
HUB_TOFU_CONFIGS = {"full", "retain_perturbed", "real_authors", "real_authors_perturbed", "world_facts",
                    "world_facts_perturbed",
                    *(f"{kind}{p}" for kind in ("forget", "holdout") for p in ("01", "05", "10")),
                    *(f"forget{p}_perturbed" for p in ("01", "05", "10")), "retain90", "retain95", "retain99"}
HUB_MUSE_SPLITS = {("raw", "forget"), ("raw", "retain1"), ("raw", "retain2"), ("raw", "holdout"),
                   ("knowmem", "forget_qa"), ("knowmem", "retain_qa"), ("knowmem", "forget_qa_icl"),
                   ("knowmem", "retain_qa_icl"), ("verbmem", "forget")}


class FakeHub:
    """transformers.AutoConfig and datasets.load_dataset answering from the sets above (a few valid rows per
    split), recording what was asked; an unknown id or split raises as the hub client does."""

    def __init__(self, monkeypatch) -> None:
        import datasets
        import transformers

        self.models: set[str] = set()
        self.datasets: set[tuple] = set()
        monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", self.config)
        monkeypatch.setattr(datasets, "load_dataset", self.load_dataset)

    def config(self, reference: str, *args, **kwargs):
        if reference not in HUB_MODELS:
            raise OSError(f"{reference} is not a local folder and is not a valid model identifier")
        self.models.add(reference)
        return object()

    def load_dataset(self, name: str, config: str, split: str):
        if name == "locuslab/TOFU" and config in HUB_TOFU_CONFIGS and split == "train":
            rows = [{"question": f"Q{i}?", "answer": f"A{i}.", "paraphrased_answer": f"P{i}.",
                     "perturbed_answer": [f"W{i}a.", f"W{i}b."]} for i in range(2 if "forget" in config else 4)]
        elif name == "muse-bench/MUSE-News" and (config, split) in HUB_MUSE_SPLITS:
            rows = ([{"text": f"Article {i} about the news."} for i in range(3)] if config == "raw" else
                    [{"prompt": "The news", "gt": " of the day."}] if config == "verbmem" else
                    [{"question": "Who reported it?", "answer": "The BBC."}])
        else:
            raise FileNotFoundError(f"{name}: no config {config!r} with split {split!r}")
        self.datasets.add((name, config, split))
        return types.SimpleNamespace(to_list=lambda: [dict(row) for row in rows])


@pytest.mark.parametrize("name", sorted(GPU_JOBS))
def test_gpu_job_passes_unlearn_validate_against_the_hub(name, monkeypatch, capsys):
    """`unlearn validate` as a submitted job runs it (RAY_ADDRESS set: the cluster's capacity is checked by
    `unlearn run`): every model and split the job names exists, the rows validate, the grid expands."""
    from orchestrator import cli

    path = str(JOBS_DIR / name)
    spec = load_job(JOBS_DIR / name)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    hub = FakeHub(monkeypatch)
    assert cli.main(["validate", path]) == 0, capsys.readouterr().err
    assert "valid" in capsys.readouterr().out
    assert hub.models == {spec.model.target, spec.model.retain, spec.model.tokenizer} - {None}  # all looked up
    assert {source for source, _, _ in hub.datasets} == {spec.benchmark.source}
    # And the same check refuses a model the hub does not have, naming the field (exit status 2).
    assert cli.main(["validate", path, "--set", "model.retain=open-unlearning/no_such_retain90"]) == 2
    assert "field 'model.retain'" in capsys.readouterr().err


def test_smollm2_job_fine_tunes_the_packaged_base_and_sweeps_every_method():
    from orchestrator.uld import assistant_layer_count

    spec = load_job(JOBS_DIR / "smollm2_tofu.yaml")
    assert spec.has_retain_model() and spec.forget_axis() == "forget_quality"  # prepare trains the retain model
    assert {entry.name for entry in spec.sweep.methods} == set(method_names())
    uld = next(entry for entry in spec.sweep.methods if entry.name == "uld")
    assert assistant_layer_count(30, uld.params.get("assistant_layers", 0)) == 7  # a quarter of SmolLM2's 30 layers
    assert gang_fits(spec, 2, 0) == 2  # two one-worker trials side by side on 2 CPUs


def test_quickstart_sweeps_every_registered_method_two_trials_at_a_time():
    spec = load_job(JOBS_DIR / "quickstart.yaml")
    names = [entry.name for entry in spec.sweep.methods]
    assert sorted(names) == sorted(method_names()) and len(names) == 16
    assert gang_fits(spec, 2, 0) == 2
