"""Where the benchmark keeps its inputs and outputs (paths recorded in results files keep these)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
WORK = BENCH / "work"  # the prepared models and scratch folders (ignored by git)
# Our runs of run_bench, one folder each (command, logs, checkpoint journal): small, and not ignored, so that an
# unfinished run goes with the checkout and continues (--resume-ours) in a new clone, and its log is read there.
RUNS = BENCH / "runs"
DEFAULT_DATASETS = ROOT.parent / "shared" / "datasets"
BENCHMARKS = ROOT / "BENCHMARKS.md"
RESEARCH = ROOT / "docs" / "research"
