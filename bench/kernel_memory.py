"""Peak memory of the ablation kernels on one large weight: the float64 work in bounded pieces, against
the whole matrix at once (`kernels.CHUNK_ELEMENTS` unbounded; the factors are the same bit for bit).

Each case runs in a fresh process; its cost is the rise of the process's peak resident memory (VmHWM,
reset once the weight exists) over what it held then, so the numbers are CPU memory (on a GPU the same
temporaries are allocated on the device).

    python -m bench.kernel_memory            # prints the table, writes bench/results/kernel-memory.json

Shapes: a dense 8B model's MLP down projection (hidden 4096, intermediate 14336), a 70B model's (8192,
28672), and one layer of 128 fused experts of a 30B-A3B MoE (hidden 2048, expert width 768), in bf16.
Dense weights get the default exact norm-preserving ablation; fused experts always get the rank-3
approximation (their exact factors would need a scale per expert row that the adapter cannot hold).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

from bench.harness.machine import run_record
from bench.harness.paths import RESULTS
from bench.harness.publish import update_section

OUTPUT = RESULTS / "kernel-memory.json"
CASES = {
    "dense 8B down_proj (1 x 4096 x 14336), exact": ((1, 4096, 14336), "exact"),
    "dense 70B down_proj (1 x 8192 x 28672), exact": ((1, 8192, 28672), "exact"),
    "MoE 30B-A3B fused experts (128 x 2048 x 768), approximated": ((128, 2048, 768), "full"),
}

CHILD = r"""
import json, sys, torch
from heretic.ablation import kernels
shape, mode, bounded = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
if not bounded:
    kernels.CHUNK_ELEMENTS = 1 << 62
def peak_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
matrices = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
direction = torch.randn(shape[1], generator=torch.Generator().manual_seed(1))
direction = direction / direction.norm()
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # resets the peak to the current resident memory (drawing the weight peaked higher)
before = peak_mib()
if mode == "exact":
    factors = kernels.norm_preserving_factors(matrices, direction, 1.0)
else:
    factors = kernels.ablation_factors(matrices, direction, 1.0, "full", rank=3, seed=0)
print(json.dumps({"weight_mib": matrices.numel() * 2 / 2**20, "rise_mib": peak_mib() - before}))
"""


def measure(shape: tuple[int, ...], mode: str, bounded: bool) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(shape), mode, "1" if bounded else "0"], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"the kernel measurement failed: {result.stderr.strip().splitlines()[-1]}")
    measured: dict[str, float] = json.loads(result.stdout)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--table", action="store_true", help="measure nothing: rewrite the BENCHMARKS.md section from the results"
    )
    args = parser.parse_args()
    if args.table:
        publish(json.loads(OUTPUT.read_text()))
        return
    rows = []
    print("| weight | size (bf16) | peak rise, whole matrix | peak rise, in pieces | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, (shape, mode) in CASES.items():
        whole, pieces = measure(shape, mode, bounded=False), measure(shape, mode, bounded=True)
        rows.append({"case": name, "shape": shape, "mode": mode, "whole": whole, "pieces": pieces})
        print(
            f"| {name} | {whole['weight_mib']:.0f} MiB | {whole['rise_mib']:.0f} MiB | {pieces['rise_mib']:.0f} MiB | "
            f"{pieces['rise_mib'] / whole['rise_mib']:.2f}× |"
        )
    record = {**run_record(), "rows": rows}
    OUTPUT.write_text(json.dumps(record, indent=2))
    publish(record)


def publish(record: dict[str, Any] | list[dict[str, Any]]) -> None:
    """The "memory-kernels" section of BENCHMARKS.md (a record of before run_record was kept is the bare list of rows)."""
    rows = record if isinstance(record, list) else record["rows"]
    meta = {} if isinstance(record, list) else record
    lines = [
        "Peak rise of resident memory while the factors of one bf16 weight are computed (CPU, one thread): the whole "
        "matrix converted to float64 at once against pieces of at most 2^23 float64 elements (the code today). Fused "
        "experts are approximated one expert at a time either way, so for them the bound only splits an expert.",
        "",
        "| weight | size (bf16) | peak rise, whole matrix | peak rise, in pieces | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        whole, pieces = row["whole"], row["pieces"]
        lines.append(
            f"| {row['case']} | {whole['weight_mib']:.0f} MiB | {whole['rise_mib']:.0f} MiB | {pieces['rise_mib']:.0f} MiB | "
            f"{pieces['rise_mib'] / whole['rise_mib']:.2f}× |"
        )
    update_section("\n".join(lines), "memory-kernels", meta, "python -m bench.kernel_memory")


if __name__ == "__main__":
    main()
