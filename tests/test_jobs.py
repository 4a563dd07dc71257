"""Every job spec in jobs/ is schema-valid as written, names known templates and methods, and the
GPU specs carry the settings their comments promise. No network: specs are parsed, never preflighted."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from methods import method_names
from orchestrator.templates import PROMPT_TEMPLATES
from orchestrator.spec import JobSpec, SpecError, load_spec, parse_spec, read_yaml
from orchestrator.sweep import gang_fits, grid_configs

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


@pytest.mark.parametrize("percent", ["01", "05", "10"])
def test_tofu_llama2_jobs_use_the_paper_setup(percent):
    spec = load_job(JOBS_DIR / f"tofu_llama2_forget{percent}.yaml")
    retain = f"{100 - int(percent)}"
    assert spec.benchmark.source == "locuslab/TOFU"
    assert (spec.benchmark.forget_split, spec.benchmark.retain_split, spec.benchmark.holdout_split) == (
        f"forget{percent}", f"retain{retain}", f"holdout{percent}")
    assert spec.model.target == "locuslab/tofu_ft_llama2-7b"
    assert spec.model.retain == f"open-unlearning/tofu_Llama-2-7b-chat-hf_retain{retain}"
    assert spec.model.prompt_template == "llama2"
    assert spec.model.dtype == "bfloat16"
    assert spec.scaling.zero_stage == 3 and spec.scaling.use_gpu and spec.scaling.num_workers == 8
    assert spec.training.gradient_checkpointing
    assert spec.evaluation.max_new_tokens == 200
    # TOFU's effective batch of 32: per-worker batch × accumulation × workers.
    assert spec.training.batch_size * spec.training.grad_accum * spec.scaling.num_workers == 32


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


def test_llama32_job_uses_open_unlearning_models():
    spec = load_job(JOBS_DIR / "tofu_llama32_1b_forget10.yaml")
    assert spec.model.target == "open-unlearning/tofu_Llama-3.2-1B-Instruct_full"
    assert spec.model.retain == "open-unlearning/tofu_Llama-3.2-1B-Instruct_retain90"
    assert spec.model.prompt_template == "llama3_tofu"  # open-unlearning's chat format for them, system turn included
    prompt = PROMPT_TEMPLATES["llama3_tofu"].format(question="Who wrote it?")
    assert "Today Date: 10 Apr 2025\n\nYou are a helpful assistant.<|eot_id|>" in prompt
    assert prompt.endswith("<|start_header_id|>user<|end_header_id|>\n\nWho wrote it?<|eot_id|>"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert 2 <= spec.scaling.num_workers <= 4 and spec.scaling.zero_stage in (2, 3)


def test_muse_job_reads_muse_splits():
    spec = load_job(JOBS_DIR / "muse_news.yaml")
    assert spec.benchmark.source == "muse-bench/MUSE-News"
    assert (spec.benchmark.forget_split, spec.benchmark.retain_split, spec.benchmark.holdout_split) == (
        "text_forget", "text_retain", "text_holdout")
    assert spec.model.target == "muse-bench/MUSE-news_target"
    assert spec.model.retain == "muse-bench/MUSE-news_retrain"
    assert read_yaml(JOBS_DIR / "muse_news.yaml")["benchmark"]["kind"] == "muse"
