"""Two runs of our search with the same seed and settings, trial by trial: the same scores, and the time.

For a change that must not change results (an exact speed-up), the two runs ask the sampler the same
questions and get the same answers, so their trials pair up one to one: this prints, for each trial,
both runs' refusals, KL and seconds, whether the scores are identical, and the median time ratio.

    python -m bench.research.paired_trials bench/results/20261202-142140.json bench/results/20261202-180000.json

Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def trials(path: Path) -> tuple[str, list[dict[str, Any]]]:
    data = json.loads(path.read_text())
    ((label, tool),) = data["tools"].items()
    return label, tool["trials"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path, help="a run_bench results file of our search")
    parser.add_argument("after", type=Path, help="the same search with the change")
    args = parser.parse_args()
    (before_label, before), (after_label, after) = trials(args.before), trials(args.after)
    print(f"| trial | {before_label}: refusals, KL, s | {after_label}: refusals, KL, s | same score | time ratio |")
    print("|---:|---|---|---|---:|")
    ratios, same = [], 0
    for a, b in zip(before, after):
        identical = (a["refusals"], a["cut"]) == (b["refusals"], b["cut"]) and abs(a["kl"] - b["kl"]) <= 1e-6
        same += identical
        ratio = b["seconds"] / a["seconds"]
        ratios.append(ratio)
        cut = lambda t: "≥" if t["cut"] else ""  # noqa: E731
        print(
            f"| {a['number']} | {cut(a)}{a['refusals']}, {a['kl']:.4f}, {a['seconds']:.1f} | "
            f"{cut(b)}{b['refusals']}, {b['kl']:.4f}, {b['seconds']:.1f} | {'yes' if identical else 'NO'} | {ratio:.2f} |"
        )
    median_before = statistics.median(t["seconds"] for t in before)
    median_after = statistics.median(t["seconds"] for t in after)
    print(
        f"\n{same} of {min(len(before), len(after))} trials scored identically; median trial {median_before:.1f} s -> "
        f"{median_after:.1f} s ({median_after / median_before:.2f}x); median of the paired ratios {statistics.median(ratios):.2f}"
    )


if __name__ == "__main__":
    main()
