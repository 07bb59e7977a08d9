"""The exact norm-preserving ablation against its rank-r LoRA approximation, trial by trial.

A full ablation keeps every row's norm: M' = diag(s) (M + B A) with rank-1 factors and a per-row scale s.
Until this existed it was stored as the best rank-3 approximation of M' - M (a randomized SVD per matrix
and trial, as the reference does). This script loads the benchmark model once, as a search at the
benchmark's settings does (`--judge rules`), and scores the same trials of a stored run both ways, in
alternating order (exact-approximate, approximate-exact, ...) so that a drift of the machine's speed hits
both alike: the time to write the adapters, the KL pass and the refusal count (no cut-off).

    python -m bench.research.exact_full bench/results/20261202-180405.json --every 3

Writes bench/results/exact-full.json; prints a table.
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


def measure(session: Session, parameters: Any) -> dict[str, float]:
    """Seconds to write the adapters and to score them, and the scores."""
    started = time.perf_counter()
    session.ablator.apply(parameters, session.directions)
    applied = time.perf_counter()
    kl = session.evaluator.kl()
    refusals = session.evaluator.count_refusals().refusals
    done = time.perf_counter()
    return {"apply_s": applied - started, "score_s": done - applied, "kl": kl, "refusals": refusals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a run_bench results file whose trials have parameters")
    parser.add_argument("--every", type=int, default=3, help="score every k-th trial of the run")
    args = parser.parse_args()
    data = json.loads(args.results.read_text())
    ((label, tool),) = data["tools"].items()
    argv = our_command(data["settings"], prepare_model(), REFERENCE_MARKERS, ["--checkpoint-dir", str(WORK / "exact-full")])
    # Prepared with the approximation (LoRA rank 3); the exact variant's output scales are hooked in here,
    # so that one model serves both (the hooks do nothing while no scale is set).
    session = prepare(settings_from_argv([*argv[1:], "--judge", "rules", "--no-full-normalization-exact"]), interactive=False)
    ablator = session.ablator
    for name, lora in ablator._lora_layers.items():
        lora.register_forward_hook(ablator._scale_hook(name))
    rows: list[dict[str, Any]] = []
    for position, trial in enumerate(tool["trials"][:: args.every]):
        parameters = stored_trial_parameters(session, trial["params"])
        results = {}
        for exact in (True, False) if position % 2 == 0 else (False, True):
            ablator.exact = exact
            results["exact" if exact else "approximate"] = measure(session, parameters)
        exact, approximate = results["exact"], results["approximate"]
        row = {
            "trial": trial["number"],
            "first_changed_layer": ablator.unchanged_layers,
            **{f"{key}_{variant}": round(value, 5) for variant, values in results.items() for key, value in values.items()},
        }
        rows.append(row)
        print(
            f"trial {row['trial']:>2}: write {exact['apply_s']:4.1f} s / {approximate['apply_s']:4.1f} s  "
            f"score {exact['score_s']:5.1f} s / {approximate['score_s']:5.1f} s  refusals {exact['refusals']:>2} / "
            f"{approximate['refusals']:>2}  KL {exact['kl']:.4f} / {approximate['kl']:.4f}  (exact / approximation)",
            flush=True,
        )

    def median(key: str) -> float:
        return statistics.median(row[key] for row in rows)

    def total(variant: str) -> float:
        return sum(row[f"apply_s_{variant}"] + row[f"score_s_{variant}"] for row in rows)

    summary = {
        "source": args.results.name,
        "label": label,
        "rows": rows,
        **{
            f"median_{key}_{variant}": median(f"{key}_{variant}")
            for key in ("apply_s", "score_s")
            for variant in ("exact", "approximate")
        },
        "trial_time_ratio": total("exact") / total("approximate"),
        "median_kl_ratio": statistics.median(
            row["kl_exact"] / row["kl_approximate"] for row in rows if row["kl_approximate"] > 0
        ),
        "refusal_difference": sum(row["refusals_exact"] - row["refusals_approximate"] for row in rows),
    }
    (RESULTS / "exact-full.json").write_text(json.dumps(summary, indent=2))
    print(
        f"writing the adapters: median {summary['median_apply_s_approximate']:.2f} s approximated -> "
        f"{summary['median_apply_s_exact']:.2f} s exact; whole trials {summary['trial_time_ratio']:.2f}x; "
        f"KL exact / approximated: median {summary['median_kl_ratio']:.2f}; refusals exact - approximated, summed: "
        f"{summary['refusal_difference']:+d}"
    )


if __name__ == "__main__":
    main()
