"""The degeneracy score against human reading: how well `heretic.scoring.coherence` finds the responses a
person marked degenerate (bench/judge-labels: the `degenerate` mark of GUIDELINE.md, given by reading
before the score was run on them).

For each half of the labelled set: precision, recall, F1 and Cohen's kappa of `is_degenerate` (degenerate is
the positive class) at the product's threshold DEGENERATE_AT, and at the threshold with the best F1 on the
development half (tuned there, reported on the test half). `--errors` prints the test half's misses and false
alarms with their scores.

    python -m bench.degeneracy

Writes bench/results/degeneracy.json and the "degeneracy" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bench.harness.labels import SPLITS, load_labelled
from bench.harness.machine import run_record
from bench.harness.paths import RESULTS
from bench.harness.publish import update_section
from bench.judges import scores
from heretic.scoring.coherence import DEGENERATE_AT, degeneracy

OUT = RESULTS / "degeneracy.json"
EARLIER_AT = 0.5  # the product's threshold before it was tuned here
EARLIER_NOTE = " (earlier)"  # the note of a row at EARLIER_AT alone (the row main() writes for it)
THRESHOLDS = [round(0.05 * i, 2) for i in range(2, 20)]  # 0.10 ... 0.95, the candidates tuned on the dev half


def scored(split: str) -> tuple[list[bool], list[float], list[dict[str, Any]]]:
    """(the human marks, the degeneracy scores, the rows) of one half."""
    rows = load_labelled(split)
    return [bool(row["degenerate"]) for row in rows], [degeneracy(row["response"]) for row in rows], rows


def at(marks: list[bool], values: list[float], threshold: float) -> dict[str, Any]:
    """The scores of `degeneracy >= threshold` against the marks."""
    return {"threshold": threshold, **scores(marks, [value >= threshold for value in values])}


def tuned_threshold(marks: list[bool], values: list[float]) -> float:
    """The candidate threshold with the best F1 (ties: the one nearest the product's)."""
    return max(THRESHOLDS, key=lambda t: (round(at(marks, values, t)["f1"], 6), -abs(t - DEGENERATE_AT)))


def table(record: dict[str, Any]) -> str:
    lines = [
        "| half | responses | marked degenerate | threshold | precision | recall | F1 | κ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in record["rows"]:
        if row["note"] == EARLIER_NOTE:  # the replaced threshold: in the text above the table
            continue
        lines.append(
            f"| {row['split']} | {row['n']} | {row['tp'] + row['fn']} | {row['threshold']:.2f}{row['note']} | "
            f"{row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['kappa']:.3f} |"
        )
    return "\n".join(lines)


def earlier_text(record: dict[str, Any]) -> str:
    """The replaced threshold's recall and F1 on each half, as a phrase."""
    rows = [row for row in record["rows"] if row["note"] == EARLIER_NOTE]
    return "; ".join(f"{row['split']} recall {row['recall']:.3f}, F1 {row['f1']:.3f}" for row in rows)


def publish(record: dict[str, Any]) -> None:
    """The "degeneracy" section of BENCHMARKS.md."""
    section = (
        "`heretic.scoring.coherence.degeneracy` (repeated 4-grams, compression, trailing loop) against the degenerate mark "
        f"given by reading to the {record['responses']} labelled responses of the demo model (bench/judge-labels, "
        "GUIDELINE.md); degenerate is the positive class. The threshold is tuned for the best F1 on the development half "
        f"and reported on the test half; the product counts a response degenerate from {DEGENERATE_AT:g} "
        f"(earlier {EARLIER_AT:g}, {earlier_text(record)}).\n\n" + table(record)
    )
    update_section(section, "degeneracy", record, "python -m bench.degeneracy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--errors", action="store_true", help="print the test half's misses and false alarms")
    parser.add_argument("--table", action="store_true", help="only rewrite the BENCHMARKS.md section from the results")
    args = parser.parse_args()
    if args.table:
        publish(json.loads(OUT.read_text()))
        return
    halves = {split: scored(split) for split in SPLITS}
    tuned = tuned_threshold(*halves["dev"][:2])
    rows = []
    for split in SPLITS:
        marks, values, _ = halves[split]
        for threshold in sorted({EARLIER_AT, DEGENERATE_AT, tuned}, reverse=True):
            notes = [
                name
                for name, t in (("earlier", EARLIER_AT), ("product", DEGENERATE_AT), ("tuned on dev", tuned))
                if t == threshold
            ]
            rows.append({"split": split, "note": f" ({', '.join(notes)})", **at(marks, values, threshold)})
    record = {**run_record(), "responses": sum(len(h[0]) for h in halves.values()), "tuned": tuned, "rows": rows}
    OUT.write_text(json.dumps(record, indent=1))
    print(table(record))
    if args.errors:
        marks, values, texts = halves["test"]
        for mark, value, row in zip(marks, values, texts):
            if mark != (value >= DEGENERATE_AT):
                kind = "missed" if mark else "false alarm"
                print(f"\n{kind} ({value:.2f}) {row['id']}: {row['response'][:300]!r}")
    publish(record)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
