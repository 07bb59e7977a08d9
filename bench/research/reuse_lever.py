"""What reusing the original's layers below a trial's first changed layer buys, trial by trial.

Two searches run one after the other are too noisy on a shared machine to see a 10 % change (their
trials' times differ by up to 30 % either way). This script loads the benchmark model once, as a
search at the benchmark's settings does (`--judge rules`; the original's passes recorded), and
scores the same trials of a stored run twice each, with the reuse on and off in alternating order
(on-off, off-on, ...), so that a drift of the machine's speed hits both alike: a trial's work is its
KL pass plus its refusal count, every response generated until its verdict is fixed (no cut-off).
It checks that both give the same scores and reports the time of each.

    python -m bench.research.reuse_lever bench/results/20261202-180405.json --every 3

Writes bench/results/reuse-lever.json; prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.harness.models import prepare_model
from bench.harness.paths import RESULTS, WORK
from bench.harness.tools import REFERENCE_MARKERS, our_command, stored_trial_parameters
from heretic.cli import settings_from_argv
from heretic.session import Session, prepare


def score(session: Session) -> tuple[float, float, int]:
    """(seconds, KL, refusals) of the applied ablation."""
    started = time.perf_counter()
    kl = session.evaluator.kl()
    refusals = session.evaluator.count_refusals().refusals
    return time.perf_counter() - started, kl, refusals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a run_bench results file whose trials have parameters")
    parser.add_argument("--every", type=int, default=3, help="score every k-th trial of the run")
    args = parser.parse_args()
    data = json.loads(args.results.read_text())
    ((label, tool),) = data["tools"].items()
    argv = our_command(data["settings"], prepare_model(), REFERENCE_MARKERS, ["--checkpoint-dir", str(WORK / "reuse-lever")])
    session = prepare(settings_from_argv([*argv[1:], "--judge", "rules"]), interactive=False)
    engine, arch = session.engine, session.arch
    reuse = engine.reuse
    assert reuse is not None and reuse.records, "the original's passes were not recorded"
    rows: list[dict[str, Any]] = []
    for position, trial in enumerate(tool["trials"][:: args.every]):
        parameters = stored_trial_parameters(session, trial["params"])
        session.ablator.apply(parameters, session.directions)
        results = {}
        for on in (True, False) if position % 2 == 0 else (False, True):
            engine.reuse = reuse if on else None
            results[on] = score(session)
        engine.reuse = reuse
        (on_s, on_kl, on_refusals), (off_s, off_kl, off_refusals) = results[True], results[False]
        row = {
            "trial": trial["number"],
            "first_changed_layer": session.ablator.unchanged_layers,
            "seconds_on": round(on_s, 2),
            "seconds_off": round(off_s, 2),
            "same_score": on_refusals == off_refusals and abs(on_kl - off_kl) <= 1e-6,
            "refusals": on_refusals,
            "kl": on_kl,
        }
        rows.append(row)
        print(
            f"trial {row['trial']:>2}: first changed layer {row['first_changed_layer']:>2}  on {on_s:5.1f} s  off {off_s:5.1f} s  "
            f"({on_s / off_s:.2f}x)  refusals {on_refusals}/{off_refusals}  KL {on_kl:.4f}/{off_kl:.4f}",
            flush=True,
        )
    on_total, off_total = sum(r["seconds_on"] for r in rows), sum(r["seconds_off"] for r in rows)
    summary = {
        "source": args.results.name,
        "label": label,
        "layers": arch.num_layers,
        "recorded_mib": round(reuse.used / 2**20, 1),
        "rows": rows,
        "same_scores": sum(r["same_score"] for r in rows),
        "median_on_s": statistics.median(r["seconds_on"] for r in rows),
        "median_off_s": statistics.median(r["seconds_off"] for r in rows),
        "total_ratio": on_total / off_total,
        "median_ratio": statistics.median(r["seconds_on"] / r["seconds_off"] for r in rows),
    }
    (RESULTS / "reuse-lever.json").write_text(json.dumps(summary, indent=2))
    print(
        f"{summary['same_scores']} of {len(rows)} trials scored identically; recorded {summary['recorded_mib']} MiB; "
        f"median {summary['median_off_s']:.1f} s off -> {summary['median_on_s']:.1f} s on; total {summary['total_ratio']:.2f}x, "
        f"median of the per-trial ratios {summary['median_ratio']:.2f}x"
    )


if __name__ == "__main__":
    main()
