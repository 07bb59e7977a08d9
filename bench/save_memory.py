"""Peak memory of the merged save: tensor by tensor from the checkpoint files against the in-memory merge.

Each method runs in a fresh process: load the model (as a search would), build its adapters and an
ablation of every layer, reset the peak resident size (Linux: /proc/self/clear_refs), save the merged
model, and read the peak (VmHWM). The numbers are the resident memory before the save, the peak
during it, and the difference: what the save needs beside the model being searched.

    python -m bench.save_memory                          # the demo model (Qwen2.5-Coder-0.5B, from its GGUF)
    python -m bench.save_memory --model PATH_OR_GGUF     # any model Heretic loads

Writes bench/results/save_memory.json (--output to write elsewhere) and prints a table. Run it on an
otherwise idle machine: other processes do not change a process's peak, but swapping would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness.machine import cpu_flags, git_commit, machine
from bench.harness.paths import RESULTS, ROOT
from bench.harness.publish import recorded, update_section

OUTPUT = RESULTS / "save_memory.json"
METHODS = ("in-memory", "streamed")


def measure(model: str, method: str, dtype: str, cache_dir: str, target: Path) -> dict[str, Any]:
    """One save, in this process (the child): the memory before and during it."""
    import gc

    import torch

    from heretic.ablation.adapters import Ablator
    from heretic.ablation.parameters import AblationParameters, ComponentKernel
    from heretic.export.save import save_merged
    from heretic.model.architecture import build_architecture_map
    from heretic.model.loading import load_model
    from heretic.model.memory import process_memory, reset_peaks

    loaded = load_model(model, dtypes=[dtype], cache_dir=cache_dir)
    arch = build_architecture_map(loaded.model)
    ablator = Ablator(loaded.model, arch, "none", 1, 0)
    generator = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(arch.num_layers + 1, arch.hidden_size, generator=generator), dim=-1)
    everywhere = ComponentKernel(
        max_weight=1.0, max_weight_position=arch.num_layers / 2, min_weight=0.5, min_weight_distance=arch.num_layers
    )
    parameters = AblationParameters("global", arch.num_layers / 2, dict.fromkeys(arch.components, everywhere))
    gc.collect()
    _return_free_memory()
    reset_peaks()
    before = process_memory()
    started = time.perf_counter()
    save_merged(loaded, ablator, parameters, directions, target, method=method)
    seconds = time.perf_counter() - started
    after = process_memory()
    size = sum(file.stat().st_size for file in target.glob("*.safetensors"))
    return {
        "method": method,
        "rss_before_bytes": before.used,
        "peak_during_save_bytes": after.peak,
        "save_needs_bytes": after.peak - before.used,
        "seconds": round(seconds, 2),
        "weights_bytes": size,
        "compute_dtype": str(loaded.dtype).removeprefix("torch."),
    }


def _return_free_memory() -> None:
    """Give memory that was freed (the load's temporary copies) back to the system, so that the
    resident size before the save is what the process holds, and reuse of that free memory does not
    hide what the save allocates (glibc's malloc_trim; elsewhere nothing)."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def run_child(model: str, method: str, dtype: str, cache_dir: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="save-memory-") as folder:
        command = [
            sys.executable,
            "-m",
            "bench.save_memory",
            "--child",
            method,
            "--model",
            model,
            "--dtype",
            dtype,
            "--cache-dir",
            cache_dir,
        ]
        command += ["--target", str(Path(folder) / "out")]
        done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
        if done.returncode != 0:
            sys.exit(f"The {method} save failed:\n{done.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result


def table(rows: list[dict[str, Any]]) -> str:
    mib = 2**20
    lines = [
        f"{'method':<10} {'RSS before':>11} {'peak in save':>13} {'save needs':>11} {'seconds':>8} {'weights':>9}",
    ]
    for row in rows:
        lines.append(
            f"{row['method']:<10} {row['rss_before_bytes'] / mib:>7.0f} MiB {row['peak_during_save_bytes'] / mib:>9.0f} MiB "
            f"{row['save_needs_bytes'] / mib:>7.0f} MiB {row['seconds']:>8.1f} {row['weights_bytes'] / mib:>5.0f} MiB"
        )
    return "\n".join(lines)


# The records of the BENCHMARKS.md table: the demo model, and SmolLM2 computed in its own dtype and in float32.
PUBLISHED = ("save_memory.json", "save_memory-smollm2.json", "save_memory-smollm2-float32.json")


def publish() -> None:
    """The "memory-save" section of BENCHMARKS.md, from the records of PUBLISHED that exist."""
    mib = 2**20
    records = [json.loads((RESULTS / name).read_text()) for name in PUBLISHED if (RESULTS / name).is_file()]
    lines = [
        "Peak resident memory of the merged save, each method in a fresh process after a search's set-up (adapters and "
        "an ablation of every layer); *save needs* is the peak during the save minus the resident memory before it.",
        "",
        "| model | compute dtype | method | RSS before | peak in save | save needs | seconds | weights |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for record in records:
        for row in record["runs"]:
            lines.append(
                f"| {record['model']} | {row['compute_dtype']} | {row['method']} | {row['rss_before_bytes'] / mib:,.0f} MiB | "
                f"{row['peak_during_save_bytes'] / mib:,.0f} MiB | {row['save_needs_bytes'] / mib:,.0f} MiB | "
                f"{row['seconds']:.1f} | {row['weights_bytes'] / mib:,.0f} MiB |"
            )
    command = "python -m bench.save_memory [--model MODEL] [--dtype float32] --output bench/results/save_memory-NAME.json"
    update_section("\n".join(lines), "memory-save", recorded(*records), command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model Heretic loads (default: the demo model)")
    parser.add_argument("--dtype", default="auto", help="compute dtype: auto (the model's own), bfloat16, float32, float16")
    parser.add_argument("--cache-dir", default="~/.cache/heretic")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--target", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--table", action="store_true", help="measure nothing: rewrite the BENCHMARKS.md section from the results"
    )
    args = parser.parse_args()
    if args.table:
        publish()
        return
    if args.child:
        print(json.dumps(measure(args.model, args.child, args.dtype, args.cache_dir, args.target)))
        return
    model = args.model
    if model is None:
        from heretic.demo import demo_model_file

        model = str(demo_model_file(args.cache_dir))
    rows = [run_child(model, method, args.dtype, args.cache_dir) for method in METHODS]
    record = {
        "model": Path(model).name,
        "dtype": args.dtype,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "cpu_flags": cpu_flags(),
        "commit": git_commit(),
        "runs": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"Merged save of {record['model']} ({rows[0]['compute_dtype']}), {record['machine']}")
    print(table(rows))
    print(f"Written to {args.output}")


if __name__ == "__main__":
    main()
