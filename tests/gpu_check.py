"""`make test-gpu`: the checks only a GPU can make, on this machine's CUDA (or MPS) device.

Each check runs on tiny random models built here (no download), so the whole script takes a few minutes:
the dtype measurement, the kernels off the CPU, the batch-size probe and the out-of-memory backoff, a
model offloaded in part, a model split over two GPUs with layer reuse (two GPUs), bitsandbytes 4- and
8-bit searches with a merged save (bitsandbytes installed), workers pinned one GPU each (two GPUs), a
short search end to end with save and `--reproduce`, and a short search on the demo model when its
GGUF is installed. It prints a table, and exits 1 when any check fails; a check whose requirement is
missing says "not run" and why. On a machine without a GPU it says so in one line and exits 0.

Run from the repository's root: `make test-gpu` (or `PYTHONPATH=src:tests python3 tests/gpu_check.py`).
On a machine without network access, the packages heretic needs beyond a PyTorch image travel as wheels:
`make gpu-wheels` here fetches them into .whl/, and `make test-gpu` there installs them first.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
Check = Callable[[Path, torch.device], str]  # returns a detail line; raises on failure; NotRun when it cannot run


class NotRun(Exception):
    """A check whose requirement (a second GPU, bitsandbytes, the demo model) is missing here."""


def accelerator() -> torch.device | None:
    """The CUDA GPU or Apple GPU the checks run on (heretic's own accelerator lookup), or None."""
    from heretic.model.device import accelerator as kind

    found = kind()
    return {"cuda": torch.device("cuda", 0), "mps": torch.device("mps")}.get(found) if found else None


def tiny(kind: str, folder: Path) -> Path:
    """A tiny random model of `kind` saved in `folder` (the test suite's builder)."""
    from tiny import save_tiny

    return folder if (folder / "config.json").is_file() else save_tiny(kind, folder)


def heretic(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    """Run the command line in a subprocess; its output, or an AssertionError with its last lines."""
    command = [sys.executable, "-m", "heretic", *args]
    done = subprocess.run(
        command,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | (env or {}) | {"HERETIC_HEADLESS": "1"},
    )
    if done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
    return done.stdout


def search_flags(model: Path, work: Path, trials: int = 3) -> list[str]:
    from tiny import PROMPT_FLAGS, SCORING_FLAGS

    trials_flags = ["--n-trials", str(trials), "--n-startup-trials", "2"]
    return [str(model), *PROMPT_FLAGS, *SCORING_FLAGS, *trials_flags, "--checkpoint-dir", str(work / "checkpoints")]


# --- The checks ------------------------------------------------------------------------------------


def check_dtype(work: Path, device: torch.device) -> str:
    """The dtype probe runs on the GPU and picks a native half-precision dtype (bfloat16 from Ampere on,
    float16 before), never an emulated one."""
    from heretic.model.hardware import candidate_dtypes, measure_dtype, rank_dtypes

    measured = [measure_dtype(dtype, device, 2048, 8192) for dtype in candidate_dtypes(torch.float32, device)]
    ranked = rank_dtypes(measured)
    assert ranked, measured
    if device.type != "cpu":  # (--device cpu: the script's own dry run)
        assert ranked[0] in (torch.bfloat16, torch.float16), measured
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        assert torch.bfloat16 not in [m.dtype for m in measured], "bfloat16 measured on a pre-Ampere GPU"
    return ", ".join(f"{str(m.dtype).removeprefix('torch.')} {m.gflops or 0:.0f} GFLOP/s" for m in measured)


def check_kernels(work: Path, device: torch.device) -> str:
    """The exact and approximate kernels on the GPU: no float64, the same factors as on the CPU (to float32
    rounding), and the time of a 4096 x 14336 matrix's exact factors."""
    from heretic.ablation.kernels import norm_preserving_factors
    from heretic.model.device import synchronize

    generator = torch.Generator().manual_seed(0)
    matrices = torch.randn(1, 1024, 2048, generator=generator)
    v = torch.nn.functional.normalize(torch.randn(1024, generator=generator), dim=0)
    cpu = norm_preserving_factors(matrices, v, 0.8).merged(matrices)
    gpu = norm_preserving_factors(matrices.to(device), v.to(device), 0.8).merged(matrices.to(device)).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-5, rtol=1e-4)
    large = torch.randn(1, 4096, 14336, device=device)
    u = torch.nn.functional.normalize(torch.randn(4096, device=device), dim=0)
    norm_preserving_factors(large, u, 0.8)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    norm_preserving_factors(large, u, 0.8)
    synchronize(device)
    return f"GPU equals CPU; exact factors of 4096 x 14336 in {1000 * (time.perf_counter() - started):.1f} ms"


def check_batch_and_oom(work: Path, device: torch.device) -> str:
    """The probe decodes the longest evaluation prompts at full length on the GPU; a real out-of-memory
    error inside a trial's scoring halves the batch and scores again, with the memory given back."""
    from tiny import PROMPTS

    from heretic.model import batching
    from heretic.model.generation import Engine
    from heretic.model.loading import eos_token_ids, load_model

    loaded = load_model(str(tiny("llama", work / "llama")), dtypes=["fastest"], device_map="auto", cache_dir=str(work / "cache"))
    engine = Engine(loaded.model, loaded.tokenizer, eos_token_ids(loaded), batch_size=8)
    assert engine.device.type == device.type, engine.device
    prompts = engine.encode(PROMPTS * 8)
    workload = batching.workload_for(engine.device, prompts, 64)
    assert device.type == "cpu" or (workload.steps == 64 and workload.prompts is not None), workload
    size, measurements = batching.choose_batch_size(engine, 32, workload)
    engine.batch_size = 16
    generate = engine.generate

    def too_big(ids: list[list[int]], *args: object, **kwargs: object) -> object:
        if engine.batch_size > 4:
            torch.empty(1 << 46, dtype=torch.uint8, device=device)  # 64 TiB: a real out-of-memory error
        return generate(ids, *args, **kwargs)  # type: ignore[arg-type]

    engine.generate = too_big  # type: ignore[method-assign]
    responses = batching.halving_on_oom(engine, lambda: engine.generate(prompts, 8))
    assert responses is not None and len(responses) == len(prompts) and engine.batch_size == 4
    return f"probe chose {size} ({len(measurements)} sizes, {workload.steps} steps); 16 -> 4 after 2 out-of-memory errors"


def check_offload(work: Path, device: torch.device) -> str:
    """Layers offloaded to the CPU (accelerate's hooks, meta weights): the ablated model's logits equal
    those of the model held whole on the GPU."""
    from transformers import AutoModelForCausalLM

    from heretic.ablation.adapters import Ablator
    from heretic.ablation.parameters import AblationParameters, ComponentKernel
    from heretic.model.architecture import build_architecture_map

    folder = tiny("llama", work / "llama")
    parameters = AblationParameters(
        "global", 1.5, {"attn": ComponentKernel(1.2, 2.0, 0.6, 2.0), "mlp": ComponentKernel(1.0, 2.0, 0.5, 2.0)}
    )
    directions = torch.nn.functional.normalize(torch.randn(5, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    gpu = 0 if device.type == "cuda" else device.type
    placement = {"model.embed_tokens": gpu, "model.rotary_emb": gpu, "model.norm": gpu, "lm_head": gpu}
    placement |= {f"model.layers.{index}": "cpu" if index % 2 else gpu for index in range(4)}
    logits = []
    for device_map in ({"": gpu}, placement):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map=device_map)
        ablator = Ablator(model, build_architecture_map(model), "full", 3, 0)
        ablator.apply(parameters, directions)
        with torch.no_grad():
            logits.append(ablator.peft_model(torch.tensor([[1, 5, 9, 3]], device=device)).logits.cpu())
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    return "2 of 4 layers offloaded to the CPU: the same logits as on the GPU alone"


def check_two_gpus(work: Path, device: torch.device) -> str:
    """A model split over two GPUs: a trial's pass that replays the original's layers below its first
    changed layer equals a whole pass (recorded keys and values go to each layer's own GPU)."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        raise NotRun("needs two CUDA GPUs")
    from tiny import PROMPTS

    from heretic.model.generation import Engine
    from heretic.model.loading import eos_token_ids, load_model
    from heretic.model.reuse import LayerReuse

    placement = '{"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0, '
    placement += '"model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}'
    loaded = load_model(
        str(tiny("llama", work / "llama")), dtypes=["float32"], device_map=placement, cache_dir=str(work / "cache")
    )
    engine = Engine(loaded.model, loaded.tokenizer, eos_token_ids(loaded), batch_size=2)
    ids = engine.encode(PROMPTS)
    whole = engine.first_logprobs(ids)
    unchanged = [4]
    engine.reuse = reuse = LayerReuse(list(loaded.model.model.layers), lambda: unchanged[0])
    with reuse.recording_original():
        engine.first_logprobs(ids)
    unchanged[0] = 3  # skip layers 0-2 (two GPUs), start at layer 3
    torch.testing.assert_close(engine.first_logprobs(ids), whole, atol=1e-5, rtol=0)
    assert reuse.skipped_layers > 0
    return f"layers 0-1 on cuda:0, 2-3 on cuda:1; {reuse.skipped_layers} layer passes replayed, logits equal"


def check_bitsandbytes(work: Path, device: torch.device) -> str:
    """A 4-bit and an 8-bit search on the GPU, each saved merged: the weights are the full-precision model's
    ablation (finite, full precision, no quantization config)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise NotRun("bitsandbytes is not installed") from None
    import json

    from safetensors.torch import load_file

    folder = work / "quantizable"
    if not (folder / "config.json").is_file():
        import transformers as tf
        from tiny import make_tokenizer

        torch.manual_seed(0)
        config = tf.LlamaConfig(
            vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, eos_token_id=2, pad_token_id=0, bos_token_id=0,
        )  # fmt: skip
        tf.LlamaForCausalLM(config).save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
    for quantization in ("bnb-4bit", "bnb-8bit"):
        out = work / f"out-{quantization}"
        heretic(
            *search_flags(folder, work / quantization, 2),
            "--quantization",
            quantization,
            "--action",
            "save",
            "--output-dir",
            str(out),
            cwd=work,
        )
        tensors = load_file(out / "model.safetensors")
        assert all(t.is_floating_point() and torch.isfinite(t).all() for t in tensors.values())
        assert "quantization_config" not in json.loads((out / "config.json").read_text())
    return "4-bit and 8-bit: 2 trials each, merged saves in full precision"


def check_workers(work: Path, device: torch.device) -> str:
    """--workers 2 on two GPUs: each worker runs on its own GPU (CUDA_VISIBLE_DEVICES), one study."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        raise NotRun("needs two CUDA GPUs")
    output = heretic(*search_flags(tiny("llama", work / "llama"), work / "workers", 4), "--workers", "2", cwd=work)
    assert "GPU 0" in output and "GPU 1" in output, output[-800:]
    return "two workers, GPU 0 and GPU 1, 4 trials in one study"


def check_search(work: Path, device: torch.device) -> str:
    """A short search on the GPU end to end, saved, then rebuilt with --reproduce: the rebuild matches the
    record (by hash, or within rounding)."""
    out = work / "search-out"
    heretic(*search_flags(tiny("qwen2", work / "qwen2"), work / "search"), "--action", "save", "--output-dir", str(out), cwd=work)
    rebuilt = work / "rebuilt"
    output = heretic(
        "--reproduce", str(out / "heretic.json"), "--model", str(work / "qwen2"), "--output-dir", str(rebuilt), cwd=work
    )
    assert "weight files match the record" in " ".join(output.split()), output[-800:]
    return "3 trials, saved, reproduced: " + ("by hash" if "SHA-256)" in output else "within rounding")


def check_demo(work: Path, device: torch.device) -> str:
    """A short search on the demo model (Qwen2.5-Coder-0.5B-Instruct), when its GGUF packages are installed."""
    from heretic.demo import chunk_files

    try:
        chunk_files()
    except Exception as error:  # noqa: BLE001 - the packages are not installed here
        raise NotRun(f"the demo model is not installed ({str(error)[:80]})") from None
    output = heretic("--demo", "--n-trials", "4", "--output-dir", str(work / "demo"), cwd=work, timeout=480)
    return " ".join(output.split())[-160:]


CHECKS: list[tuple[str, Check]] = [
    ("dtype measurement", check_dtype),
    ("kernels on the GPU", check_kernels),
    ("batch size and out-of-memory backoff", check_batch_and_oom),
    ("offloaded layers", check_offload),
    ("two GPUs with layer reuse", check_two_gpus),
    ("bitsandbytes 4/8-bit search and save", check_bitsandbytes),
    ("workers, one GPU each", check_workers),
    ("search, save and reproduce", check_search),
    ("demo model search", check_demo),
]


def main(argv: list[str]) -> int:
    """--device cpu runs every check on the CPU instead: the script's own dry run, on any machine."""
    device = torch.device(argv[argv.index("--device") + 1]) if "--device" in argv else accelerator()
    if device is None:
        print("No GPU here (neither CUDA nor MPS is available): the GPU checks have nothing to run on.")
        return 0
    from rich.console import Console
    from rich.table import Table

    from heretic.model.device import free_memory

    name = {"cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else "", "mps": "Apple MPS"}.get(
        device.type, "the CPU"
    )
    table = Table(title=f"GPU checks on {name} (torch {torch.__version__})", title_justify="left")
    for column in ("check", "result", "seconds", "detail"):
        table.add_column(column)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="heretic-gpu-") as folder:
        work = Path(folder)
        for title, check in CHECKS:
            started = time.perf_counter()
            try:
                with contextlib.chdir(work):
                    result, detail = "ok", check(work, device)
            except NotRun as why:
                result, detail = "not run", str(why)
            except Exception as error:  # noqa: BLE001 - every failure is reported, the next check still runs
                failed += 1
                result, detail = "FAILED", f"{type(error).__name__}: {str(error)[:300]}"
                traceback.print_exc()
            table.add_row(title, result, f"{time.perf_counter() - started:.1f}", detail)
            free_memory()
    Console(width=200).print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
