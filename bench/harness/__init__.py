"""The benchmark's library: the drivers of both tools (tools), the benchmark models (models), the front
metrics (metrics), our recorded runs (runs), the machine and commit a run records (machine), the
side-by-side report (side_by_side), the hand-labelled refusal set (labels) and the publisher of
BENCHMARKS.md sections (publish)."""

from __future__ import annotations

from .machine import CPU_PROFILES, cpu_flags, git_commit, machine, run_record
from .metrics import KL_CAP, REFUSAL_CAPS, best_kl, best_kl_at, hypervolume, pareto
from .models import MODELS, model_gguf, prepare_model
from .paths import BENCHMARKS, DEFAULT_DATASETS, RESEARCH, RESULTS, ROOT, RUNS, WORK
from .publish import module_command, recorded, stamp, update_section
from .runs import our_run

__all__ = [
    "BENCHMARKS",
    "CPU_PROFILES",
    "DEFAULT_DATASETS",
    "KL_CAP",
    "MODELS",
    "REFUSAL_CAPS",
    "RESEARCH",
    "RESULTS",
    "ROOT",
    "RUNS",
    "WORK",
    "best_kl",
    "best_kl_at",
    "cpu_flags",
    "git_commit",
    "hypervolume",
    "machine",
    "model_gguf",
    "module_command",
    "our_run",
    "pareto",
    "prepare_model",
    "recorded",
    "run_record",
    "stamp",
    "update_section",
]
