"""Where the benchmark keeps its inputs and outputs (paths recorded in results files keep these)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
WORK = BENCH / "work"
DEFAULT_DATASETS = ROOT.parent / "shared" / "datasets"
BENCHMARKS = ROOT / "BENCHMARKS.md"
RESEARCH = ROOT / "docs" / "research"
