"""Benchmark data, by role: the embedded generator (``embedded``), TOFU and MUSE sources (``tofu``, ``muse``,
read through ``sources.load_benchmark``), file readers (``files``), row validation (``validation``) and the
torch Dataset that feeds a method's batches (``training``, imported on its own: it needs torch).

Rows follow TOFU's schema: ``question``, ``answer``, ``paraphrased_question``, ``paraphrased_answer`` and
``perturbed_answer`` (wrong answers of the same kind). Corpus rows (MUSE style) carry ``text`` instead.
Nothing here imports torch or methods/ except ``training``.
"""
from orchestrator.data.embedded import FORGET_PERCENTS, generate_benchmark, generate_corpus, split_size
from orchestrator.data.muse import KNOWMEM_EXAMPLE_SPLITS, MUSE_SPLITS, VERBMEM_SPLIT, load_muse
from orchestrator.data.sources import BENCHMARK_KINDS, keep_only, load_benchmark, row_id
from orchestrator.data.tofu import TOFU_CONFIGS, load_directory, load_hub, read_split_file
from orchestrator.data.validation import (check_muse_splits, check_splits, is_document, validate_split,
                                          validate_text_split)
from orchestrator.errors import DataError

__all__ = ["BENCHMARK_KINDS", "DataError", "FORGET_PERCENTS", "KNOWMEM_EXAMPLE_SPLITS", "MUSE_SPLITS", "TOFU_CONFIGS",
           "VERBMEM_SPLIT", "check_muse_splits", "check_splits", "generate_benchmark", "generate_corpus", "is_document",
           "keep_only", "load_benchmark", "load_directory", "load_hub", "load_muse", "read_split_file", "row_id",
           "split_size", "validate_split", "validate_text_split"]
