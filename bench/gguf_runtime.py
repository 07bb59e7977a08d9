"""GGUF files in llama.cpp against transformers: bench/results/gguf-runtime.json and its BENCHMARKS.md table.

The measurement is the suite of `make test-gguf-runtime` (tests/test_gguf_runtime.py): each file the export
writes, loaded by llama.cpp through llama-cpp-python and fed the same token ids as the merged model in
transformers (float32). Real models: the largest |next-token log-probability difference| over the
reference's ten likeliest tokens at the end of three chat prompts; tiny random models: the largest
|logit difference| over the largest |logit|, every position of two texts. This script runs that suite,
has it write what it measured, adds the date, CPU flags, commit and llama-cpp-python version, and writes
the results file and the table. It needs what `make test-gguf-runtime` installs (run that once).

    python -m bench.gguf_runtime                  # run the suite (about 10 min on 2 cores), then the table
    python -m bench.gguf_runtime --publish-only   # the table again, from the results file
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bench.harness.machine import run_record
from bench.harness.paths import RESULTS, ROOT
from bench.harness.publish import update_section

OUTPUT = RESULTS / "gguf-runtime.json"
TYPES = ("f16", "bf16", "q8_0")
SUITE = ["tests/test_gguf_runtime.py", "-m", "gguf_runtime"]
RECORD_ENV = "GGUF_RUNTIME_RECORD"  # where the suite writes what it measured (HERETIC_* names are settings)
REAL_ROWS = 5  # three full conversions and two copies of a GGUF input
TINY_FAMILIES = 6


def cell(row: dict[str, Any], kind: str, digits: int) -> str:
    if kind not in row:
        return ""
    unedited = f" ({row[kind + '_unedited']:.3f} from the unedited model)" if kind + "_unedited" in row else ""
    return f"{row[kind]:.{digits}f}{unedited}"


def section(record: dict[str, Any]) -> str:
    real, tiny, tolerances = record["real"], record["tiny"], record["tolerances"]
    demo = record["demo_refusals"]
    lines = [
        f"Each file the export writes, loaded by {record['runtime']}, fed the same token ids. Real models: the largest "
        "|next-token log-probability difference| (nats) over the reference's ten likeliest tokens; tiny random models: "
        "the largest |logit difference| over the largest |logit|. Tolerances fixed from each type's rounding before measuring.",
        "",
        "| model | path | " + " | ".join(TYPES) + " |",
        "|---|---|" + "---:|" * len(TYPES),
        *(f"| {row['model']} | {row['path']} | " + " | ".join(cell(row, kind, 4) for kind in TYPES) + " |" for row in real),
        "| tolerance | | " + " | ".join(f"{tolerances['real'][kind]:g}" for kind in TYPES) + " |",
        "",
        f"Tiny random models ({', '.join(row['family'] for row in tiny)}), the largest over the families: "
        + ", ".join(f"{kind} {max(row[kind] for row in tiny):.5f} (tolerance {tolerances['tiny'][kind]:g})" for kind in TYPES)
        + "; per family in bench/results/gguf-runtime.json.",
        "",
        f"The abliterated demo as its users get it (q8_0): of the {demo['original']} of {demo['prompts']} harmful prompts "
        f"the original refuses, it refuses {demo['transformers']} in transformers and {demo['llama_cpp']} in llama.cpp; "
        f"{demo['answered_in_one_refused_in_other']} answered in one runtime and refused in the other.",
    ]
    return "\n".join(lines)


def measure() -> dict[str, Any]:
    """Run the suite with its record switched on; its measurements with the run's date, CPU flags and commit."""
    try:
        runtime = f"llama-cpp-python {version('llama-cpp-python')}"
    except PackageNotFoundError:
        raise SystemExit("llama-cpp-python is not installed: run `make test-gguf-runtime` once, then this again.") from None
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "measured.json"
        env = {**os.environ, RECORD_ENV: str(target), "CI": "true"}  # a missing model fails rather than skips
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITE], cwd=ROOT, env=env)
        if done.returncode != 0:
            raise SystemExit(f"The llama.cpp suite failed (exit {done.returncode}); nothing was recorded.")
        measured = json.loads(target.read_text())
    full = [row for row in measured["real"] if row["path"] == "full conversion"]
    complete = (
        len(measured["real"]) == REAL_ROWS
        and all(kind in row for row in full for kind in TYPES)
        and all("q8_0" in row for row in measured["real"])
        and len(measured["tiny"]) == TINY_FAMILIES
        and all(kind in row for row in measured["tiny"] for kind in TYPES)
        and "demo_refusals" in measured
    )
    if not complete:
        raise SystemExit("The llama.cpp suite ran only part of its measurements; nothing was recorded.")
    runtime += " against transformers (float32)"
    return {**run_record(), "command": "python -m bench.gguf_runtime", "runtime": runtime, **measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--publish-only", action="store_true", help="write the table from the results file")
    args = parser.parse_args()
    if args.publish_only:
        record = json.loads(OUTPUT.read_text())
    else:
        record = measure()
        OUTPUT.write_text(json.dumps(record, indent=2) + "\n")
    update_section(section(record), "gguf-runtime", record, record["command"])
    print(section(record))


if __name__ == "__main__":
    main()
