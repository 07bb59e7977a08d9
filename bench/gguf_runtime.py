"""GGUF files in llama.cpp against transformers: the BENCHMARKS.md section from bench/results/gguf-runtime.json.

The measurement is `make test-gguf-runtime` (tests/test_gguf_runtime.py): each file the export writes,
loaded by llama.cpp through llama-cpp-python and fed the same token ids as the merged model in
transformers (float32). Real models: the largest |next-token log-probability difference| over the
reference's ten likeliest tokens at the end of three chat prompts; tiny random models: the largest
|logit difference| over the largest |logit|, every position of two texts. The test prints what it
measured; those numbers, with the date, CPU flags and commit of the run, go into the results file,
from which this script writes the table.

    python -m bench.gguf_runtime
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bench.harness.paths import RESULTS
from bench.harness.publish import update_section

OUTPUT = RESULTS / "gguf-runtime.json"
TYPES = ("f16", "bf16", "q8_0")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    record = json.loads(OUTPUT.read_text())
    update_section(section(record), "gguf-runtime", record, record["command"])
    print(section(record))


if __name__ == "__main__":
    main()
