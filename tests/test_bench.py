"""``make bench``'s pure parts: the FLOP formula, per-epoch costs, search cost, ratios and the table.

The measurements themselves (Ray trials, sweeps, subprocesses) are what ``make bench`` runs; here every
expected number is worked out by hand in the test, or counted independently by torch's FLOP counter.
"""
from __future__ import annotations

import math
import resource
import threading
import types

import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.bench.search import search_cost
from orchestrator.bench.sizes import FULL, QUICK, bench_spec
from orchestrator.bench.table import (BenchRow, bench_schema, format_table, markdown_table, measured, ratio,
                                      with_machine, write_outputs)
from orchestrator.measure import (EpochCost, PeakMemory, epoch_costs, median_seconds, steady,
                                  steady_tokens_per_second, training_flops_per_token)


# ---------------------------------------------------------------- FLOPs
def test_flops_per_token_is_six_n_plus_attention():
    # 6·N + 12·L·H·T with N = 1000, L = 2, H = 8, T = 10: 6000 + 1920.
    assert training_flops_per_token(1000, 2, 8, 10) == 7920.0
    assert training_flops_per_token(1000, 0, 8, 10) == 6000.0
    with pytest.raises(ValueError):
        training_flops_per_token(-1, 2, 8, 10)


def test_parameter_count_of_a_tiny_llama_matches_a_hand_count():
    from orchestrator.models import build_embedded_model

    # V = 50, H = 8, L = 2, I = 16, tied embeddings, as many KV heads as heads:
    # embedding V·H = 400; per layer q,k,v,o 4·H² = 256, gate/up/down 3·H·I = 384, two RMSNorms 2·H = 16
    # → 656 × 2 = 1312; final norm H = 8. Total 1720 (lm_head shares the embedding: counted once).
    model = build_embedded_model(50, 8, 2, 2, 16, 64, 0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 1720
    assert training_flops_per_token(trainable, 2, 8, 12) == 6 * 1720 + 12 * 2 * 8 * 12


def test_six_flops_per_weight_and_token_match_torchs_counter():
    from torch.utils.flop_counter import FlopCounterMode

    # A bias-free linear layer: forward 2·n·in·out, backward (input and weight gradients) 4·n·in·out.
    tokens, layer = 7, torch.nn.Linear(12, 5, bias=False)
    x = torch.randn(tokens, 12, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    assert counter.get_total_flops() == training_flops_per_token(layer.weight.numel(), 0, 0, 0) * tokens


def test_attention_flops_per_token_match_torchs_counter():
    from torch.utils.flop_counter import FlopCounterMode

    # One layer, T = 6 tokens, H = heads·head_dim = 2·4: QKᵀ and A·V are 2·T²·H each forward and twice
    # that backward → 12·T²·H per sequence = 12·H·T per token (the formula with N = 0, L = 1).
    # Written out as matmuls: the counter does not see inside CPU's fused attention kernel.
    heads, seq, head_dim = 2, 6, 4
    q, k, v = (torch.randn(1, heads, seq, head_dim, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        weights = torch.softmax(q @ k.transpose(-1, -2) / head_dim ** 0.5, dim=-1)
        (weights @ v).sum().backward()
    assert counter.get_total_flops() == training_flops_per_token(0, 1, heads * head_dim, seq) * seq


# ---------------------------------------------------------------- per-epoch costs
def reports():
    # The worker's reports: cumulative train_seconds, this epoch's tokens and evaluation seconds.
    return [
        {"epoch": 2, "train_seconds": 3.0, "epoch_tokens": 400, "eval_seconds": 0.5, "step": 8},
        {"epoch": 1, "train_seconds": 2.0, "epoch_tokens": 400, "eval_seconds": 0.7, "step": 4},
        {"epoch": 3, "train_seconds": 3.8, "epoch_tokens": 400, "eval_seconds": 0.0, "step": 12},
    ]


def test_epoch_costs_difference_the_cumulative_train_seconds():
    costs = epoch_costs(reports())
    assert [c.epoch for c in costs] == [1, 2, 3]
    assert [c.train_seconds for c in costs] == pytest.approx([2.0, 1.0, 0.8])
    assert [c.eval_seconds for c in costs] == [0.7, 0.5, 0.0]
    assert [c.tokens for c in costs] == [400, 400, 400]
    assert [c.steps for c in costs] == [4, 4, 4]  # global step 4, 8, 12


def test_steady_state_skips_the_first_epoch_and_takes_the_median():
    costs = epoch_costs(reports())
    assert [c.epoch for c in steady(costs)] == [2, 3]
    # Epochs 2 and 3: 400/1.0 = 400 and 400/0.8 = 500 tokens/s; median of two = 450.
    assert steady_tokens_per_second(costs) == pytest.approx(450.0)
    # A single epoch is its own steady state.
    assert steady_tokens_per_second([EpochCost(1, 300, 2.0, 0.0)]) == pytest.approx(150.0)
    with pytest.raises(ValueError):
        steady_tokens_per_second([EpochCost(1, 300, 0.0, 0.0)])


# ---------------------------------------------------------------- search cost
def test_search_cost_counts_each_trial_once_and_finds_the_best_score():
    rows = [
        # Trial a, 2 workers: cumulative train 2.5 s after epoch 2, evaluations 0.5 + 0.7 → (2.5 + 1.2)·2 = 7.4.
        {"trial_id": "a", "method": "ga", "epoch": 1, "train_seconds": 1.0, "eval_seconds": 0.5, "num_workers": 2,
         "forget_quality": 0.01, "utility_loss": 0.05},  # score −2 − 10·0.05 = −2.5
        {"trial_id": "a", "method": "ga", "epoch": 2, "train_seconds": 2.5, "eval_seconds": 0.7, "num_workers": 2,
         "forget_quality": 0.1, "utility_loss": 0.2},  # −1 − 2 = −3
        # Trial b, 1 worker: (3.0 + 1.0)·1 = 4.0; utility gained, so no penalty: score −3.
        {"trial_id": "b", "method": "ga", "epoch": 1, "train_seconds": 3.0, "eval_seconds": 1.0, "num_workers": 1,
         "forget_quality": 1e-3, "utility_loss": -0.1},
        # Reference rows are not trials (the retain model would score 0).
        {"trial_id": "retain", "method": "retain", "epoch": 0, "train_seconds": None, "eval_seconds": 9.0,
         "num_workers": 1, "forget_quality": 1.0, "utility_loss": 0.0},
    ]
    seconds, best, trials = search_cost(rows, utility_weight=10.0)
    assert seconds == pytest.approx(11.4)
    assert best == pytest.approx(-2.5)
    assert trials == 2


def test_search_cost_without_utility_has_no_score():
    rows = [{"trial_id": "a", "method": "ga", "epoch": 1, "train_seconds": 1.0, "eval_seconds": 1.0,
             "num_workers": 1, "forget_quality": 0.5, "utility_loss": None}]
    assert search_cost(rows, 10.0) == (2.0, None, 1)


# ---------------------------------------------------------------- ratios and the table
def test_ratio_is_value_over_baseline_or_none():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None and ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None
    assert ratio(math.inf, 2.0) is None and ratio(1.0, math.nan) is None


def test_measured_rows_carry_their_ratio_unless_not_comparable():
    row = measured("P1 orchestration", "tokens/s", 950.0, "tokens/s", "plain", 1000.0)
    assert row.ratio == pytest.approx(0.95)
    score = measured("P5 search", "best score", -2.0, "score", "grid", -4.0, comparable=False)
    assert score.ratio is None and score.baseline_value == -4.0
    alone = measured("P6 memory", "model states", 12.5, "MB")
    assert alone.baseline is None and alone.ratio is None


def sample_rows():
    return with_machine([
        measured("P1 orchestration", "tokens/s | Ray", 950.0, "tokens/s", "plain", 1000.0),
        measured("P6 memory", "model states", 12.5, "MB"),
    ], "test CPU, 2 cores, no GPU")


def test_text_and_markdown_tables_show_every_row():
    rows = sample_rows()
    text = format_table(rows).splitlines()
    assert text[0].split()[:2] == ["section", "figure"]
    assert len(text) == 2 + len(rows)  # header, rule, one line per row
    assert "950" in text[2] and "0.95" in text[2] and "1,000" in text[2]
    markdown = markdown_table(rows).splitlines()
    assert markdown[2].startswith("| P1 orchestration | tokens/s \\| Ray | 950 |")  # "|" escaped
    assert markdown[3].split(" | ")[4:6] == ["–", "–"]  # no baseline value, no ratio


def test_write_outputs_writes_the_schema_and_the_notes(tmp_path):
    parquet, markdown = write_outputs(sample_rows(), tmp_path, ["P1: how it is measured"])
    table = pq.read_table(parquet)
    assert table.schema.equals(bench_schema())
    assert table.column("ratio").to_pylist() == [pytest.approx(0.95), None]
    assert set(table.column("machine").to_pylist()) == {"test CPU, 2 cores, no GPU"}
    text = markdown.read_text()
    assert "test CPU, 2 cores, no GPU" in text and "- P1: how it is measured" in text


def test_rows_are_plain_data():
    row = sample_rows()[0]
    assert isinstance(row, BenchRow) and row.machine == "test CPU, 2 cores, no GPU"


# ---------------------------------------------------------------- measuring helpers
class FakeClock:
    """perf_counter for median_seconds: each timed call advances it by the next of ``durations``."""

    def __init__(self, durations):
        self.now, self.durations = 100.0, iter(durations)

    def perf_counter(self) -> float:
        return self.now

    def run(self) -> float:
        self.now += next(self.durations)
        return self.now


def test_median_seconds_is_the_median_of_the_timed_calls_and_returns_the_last_result(monkeypatch):
    from orchestrator import measure

    # Calls taking 6, 1 and 2 s: median 2 s (the mean would be 3); the result is the last call's, the clock
    # after it (100 + 9; the first call's would be 106).
    clock = FakeClock([6.0, 1.0, 2.0])
    monkeypatch.setattr(measure, "time", clock)
    assert median_seconds(clock.run, 3) == (pytest.approx(2.0), 109.0)
    # An even count takes the mean of the middle two: 4, 1, 9, 2 → (2 + 4) / 2 = 3 (the mean would be 4).
    clock = FakeClock([4.0, 1.0, 9.0, 2.0])
    monkeypatch.setattr(measure, "time", clock)
    assert median_seconds(clock.run, 4)[0] == pytest.approx(3.0)
    # repeats < 1 still times one call.
    clock = FakeClock([5.0])
    monkeypatch.setattr(measure, "time", clock)
    assert median_seconds(clock.run, 0) == (pytest.approx(5.0), 105.0)


class FakeProcess:
    """psutil.Process whose RSS readings are ``readings`` (the last one repeats); ``past_peak`` is set once
    a reading after the largest one has been taken."""

    def __init__(self, readings):
        self.readings, self.taken = list(readings), 0
        self.past_peak = threading.Event()

    def memory_info(self):
        value = self.readings[min(self.taken, len(self.readings) - 1)]
        self.taken += 1
        if self.taken > self.readings.index(max(self.readings)) + 1:
            self.past_peak.set()
        return types.SimpleNamespace(rss=value)


def test_peak_memory_sampler_sees_a_peak_that_neither_end_reading_sees(monkeypatch):
    import psutil

    # Readings far above any real high-water mark (1 PiB + k MiB), so getrusage cannot be the maximum:
    # at start 1 PiB, sampled +7 MiB then +1 MiB, which the end reading also sees → peak 1 PiB + 7 MiB.
    base, mib = 1 << 50, 1 << 20
    fake = FakeProcess([base, base, base + 7 * mib, base + mib])
    monkeypatch.setattr(psutil, "Process", lambda: fake)
    with PeakMemory(interval=0.001) as memory:
        assert fake.past_peak.wait(timeout=60), "the sampler thread took no reading after the peak"
    assert memory.peak == base + 7 * mib


def test_peak_memory_without_a_sampler_is_the_kernels_high_water_mark(monkeypatch):
    import psutil

    # RSS readings of 1 byte: what PeakMemory reports is then getrusage's ru_maxrss (KiB on Linux) · 1024,
    # which only grows: between the value read before and the one read after.
    monkeypatch.setattr(psutil, "Process", lambda: FakeProcess([1]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with PeakMemory(interval=None) as memory:
        pass
    assert before <= memory.peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_bench_specs_are_valid_jobs():
    from orchestrator.spec import parse_spec

    for size in (FULL, QUICK):
        spec = parse_spec(bench_spec(size, "/tmp/cache"))
        assert spec.training.epochs == size.unlearn_epochs and spec.scaling.num_workers == 1
        asha = parse_spec(bench_spec(size, "/tmp/cache", methods=[{"name": "ga"}], scheduler="asha"))
        assert asha.sweep.scheduler == "asha"


# ---------------------------------------------------------------- generation packing (the optimisation)
def test_generation_batches_are_filled_across_splits_with_the_same_token_budget():
    from orchestrator.evaluation.sharding import pack_generation_batches

    # Splits: 5 and 2 prompts decoding 16 tokens, 3 prompts decoding 32; 2 ranks, batch 3. Rank 0 owns
    # indices 0, 2, 4 of split 0, 0 of split 1, 0 and 2 of split 2; rank 1 the rest. Rank 0's 4 prompts
    # of budget 16 need 2 batches, so rank 1 gets an empty filler batch to match.
    splits = [(16, 5), (16, 2), (32, 3)]
    rank0 = pack_generation_batches(splits, 0, 2, 3)
    rank1 = pack_generation_batches(splits, 1, 2, 3)
    assert rank0 == [(16, [(0, 0), (0, 2), (0, 4)]), (16, [(1, 0)]), (32, [(2, 0), (2, 2)])]
    assert rank1 == [(16, [(0, 1), (0, 3), (1, 1)]), (16, []), (32, [(2, 1)])]
    # One worker with batch 1 (evaluate_per_sample): one prompt per call, in split order.
    assert pack_generation_batches([(16, 2), (8, 1)], 0, 1, 1) == [(16, [(0, 0)]), (16, [(0, 1)]), (8, [(1, 0)])]
    with pytest.raises(ValueError):
        pack_generation_batches(splits, 2, 2, 3)


def test_generation_packing_covers_every_prompt_once_with_equal_batch_counts():
    from orchestrator.evaluation.sharding import pack_generation_batches

    splits = [(24, 7), (16, 3), (24, 1), (32, 0), (16, 8)]
    for world in (1, 2, 3):
        for batch in (1, 4, 32):
            packed = [pack_generation_batches(splits, rank, world, batch) for rank in range(world)]
            assert len({len(p) for p in packed}) == 1  # collective forwards: same call count per rank
            for rank_batches in zip(*packed):
                assert len({budget for budget, _ in rank_batches}) == 1  # same budget on every rank
            seen = sorted(item for p in packed for _, items in p for item in items)
            assert seen == [(pos, i) for pos, (_, size) in enumerate(splits) for i in range(size)]
            for p in packed:
                assert all(len(items) <= batch and all(splits[pos][0] == budget for pos, _ in items)
                           for budget, items in p)


# ---------------------------------------------------------------- P7 start-up
def test_cli_timing_refuses_to_time_the_wrong_exit(tmp_path):
    """P7 times `unlearn validate` on a bad spec only if it really was refused (exit 2), and says so otherwise."""
    import yaml

    from orchestrator.bench.startup import cli_seconds

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(bench_spec(QUICK, str(tmp_path / "cache"), methods=[{"name": "no_such_method"}])))
    assert cli_seconds(["validate", str(bad)], 2, 1) > 0
    with pytest.raises(RuntimeError, match=r"unlearn validate exited 2, expected 0: .*no_such_method"):
        cli_seconds(["validate", str(bad)], 0, 1)
