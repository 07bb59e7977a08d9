"""`heretic --demo` timed end to end on this machine, as a new user runs it: wall time, the trials its time budget
allowed, and the chosen trial it hands out.

    python -m bench.demo_time            # one run (about 8 minutes on 2 cores); adds a row to bench/results/demo-time.json
    python -m bench.demo_time --table    # only rewrite the "demo-time" section of BENCHMARKS.md from that file

Each run starts in an empty working folder (so no checkpoint is resumed) with the model cache as it is: the first
run on a machine also assembles and dequantizes the model (`cache` says which). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness.machine import machine, run_record
from bench.harness.paths import RESULTS
from bench.harness.publish import recorded, update_section

OUTPUT = RESULTS / "demo-time.json"
COMMAND = "python -m bench.demo_time"


def cache_is_warm() -> bool:
    """Whether the demo's dequantized model is already cached (then the run skips assembling it)."""
    from heretic.config import Settings

    cache = Path(Settings().cache_dir).expanduser()
    return any(cache.rglob("*Qwen2.5-Coder-0.5B*")) if cache.is_dir() else False


def run_demo() -> dict[str, Any]:
    """One `heretic --demo` in a fresh folder: its wall time and what its saved record says."""
    warm = cache_is_warm()
    with tempfile.TemporaryDirectory(prefix="heretic-demo-time-") as folder:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "heretic", "--demo"], cwd=folder, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"heretic --demo exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        (record_file,) = Path(folder).glob("heretic-demo/*/heretic.json")
        record = json.loads(record_file.read_text())
    trial = record["trial"]
    return {
        **run_record(),
        "machine": machine(),
        "cache": "warm" if warm else "cold",
        "wall_s": round(wall, 1),
        "trials": len(set(re.findall(r"Trial\s+(\d+) \(\d+/\d+\)", done.stdout))),  # the trials this run finished
        "verification": verification_share(done.stdout),
        "chosen": {key: trial.get(key) for key in ("number", "refusals", "kl", "verified")}
        | {"heldout": record.get("heldout"), "heldout_kl": record.get("heldout_kl")},
    }


def verification_share(output: str) -> float | None:
    """The share of the search's time the count on whole responses took, as the run printed it (None: no count)."""
    shares = re.findall(r"took [^,]+, (\d+)% of the search's", " ".join(output.split()))
    return int(shares[-1]) / 100 if shares else None


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "`make demo` (`heretic --demo`: 24 trials within a 7-minute search budget, then the chosen trial's verified "
        "count, held-out counts, examples, save and report), timed end to end from an empty working folder.",
        "",
        "| date | CPU | model cache | wall | trials | whole-response count, share of search time | chosen trial: refusals "
        "(✓ on whole responses), KL | its KL on held-out harmless prompts: mean, median |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for row in rows:
        chosen = row.get("chosen") or {}
        refusals = chosen.get("refusals")
        kl = chosen.get("kl")
        text = f"{refusals}/64, {kl:.3f}" if isinstance(refusals, int) and isinstance(kl, float) else "–"
        text += " ✓" if chosen.get("verified") else ""
        heldout = chosen.get("heldout_kl") or {}
        held = f"{heldout['mean']:.3f}, {heldout['median']:.4f}" if "mean" in heldout else "–"
        flags = ", ".join(row.get("cpu_flags") or []) or "not recorded"
        trials = row.get("trials") if row.get("trials") is not None else "–"
        share = f"{row['verification']:.0%}" if row.get("verification") is not None else "–"
        lines.append(
            f"| {row['date']} | {flags} | {row['cache']} | {row['wall_s'] / 60:.1f} min | {trials} | {share} | {text} | {held} |"
        )
    return "\n".join(lines)


def publish(rows: list[dict[str, Any]]) -> None:
    update_section(table(rows), "demo-time", recorded(*rows), COMMAND)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true", help="only rewrite the BENCHMARKS.md section from the results")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = json.loads(OUTPUT.read_text()) if OUTPUT.exists() else []
    if not args.table:
        row = run_demo()
        print(json.dumps(row, indent=1))
        rows.append(row)
        OUTPUT.write_text(json.dumps(rows, indent=1))
    publish(rows)


if __name__ == "__main__":
    main()
