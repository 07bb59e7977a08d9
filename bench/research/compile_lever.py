"""Would a static KV cache with torch.compile speed up a trial's generation on this machine?

Greedy decoding of the benchmark's harmful evaluation prompts on the benchmark model (bf16), in one
batch of the size the automatic choice picked (bench/results/levers.json), every response forced to
the full length so that each variant does the same work:

- dynamic cache, eager: transformers' generate as most tools run it;
- static cache, eager: the cache preallocated at its final length;
- static cache, torch.compile (inductor): the decoding step compiled for the fixed shapes; its first
  call includes compiling, timed separately.

For scale, the same prompts through our engine as a trial runs them (rows leave the batch at end of
text or once their verdict is fixed, which a compiled fixed-shape step cannot do without recompiling).

    python -m bench.research.compile_lever                  # after run_bench.py has prepared the model

Writes bench/results/compile-lever.json; bench/research/levers.py adds it to the lever table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import CompileConfig

from bench.harness.machine import machine
from bench.harness.paths import DEFAULT_DATASETS, RESULTS, WORK
from bench.harness.tools import REFERENCE_VENV, reference_default_markers
from heretic.config import Settings
from heretic.model.generation import Engine
from heretic.model.loading import eos_token_ids
from heretic.prompts import load_prompts
from heretic.scoring.evaluator import Evaluator
from heretic.scoring.refusals import MarkerJudge
from heretic.session import load

OUTPUT = RESULTS / "compile-lever.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-response-length", type=int, default=100)
    parser.add_argument(
        "--prompts", type=int, default=0, help="batch size (default: the automatic choice in bench/results/levers.json)"
    )
    parser.add_argument("--datasets", type=Path, default=DEFAULT_DATASETS)
    args = parser.parse_args()

    model_dir = WORK / "Qwen2.5-Coder-0.5B-Instruct"
    if not (model_dir / "config.json").is_file():
        sys.exit("Run bench/run_bench.py first: it prepares the benchmark model in bench/work/.")
    levers = json.loads((RESULTS / "levers.json").read_text())
    batch_size = args.prompts or levers["batch_choice"]["batch_size"]
    settings = Settings.model_validate(
        {
            "model": str(model_dir),
            "dtypes": ["bfloat16"],
            "harmful_eval_prompts": f"{args.datasets / 'harmful_test.txt'}[:{batch_size}]",
        }
    )
    loaded = load(settings)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = load_prompts(settings.harmful_eval_prompts, settings.system_prompt)
    engine = Engine(model, tokenizer, eos_token_ids(loaded), batch_size=batch_size)
    padded = tokenizer.pad({"input_ids": engine.encode(prompts)}, padding_side="left", return_tensors="pt")
    ids, mask = padded["input_ids"], padded["attention_mask"]  # (rows, longest prompt)
    tokens = args.max_response_length
    print(f"{len(prompts)} prompts in one batch, {tokens} tokens each, longest prompt {ids.shape[1]} tokens", flush=True)

    def generate(**options: Any) -> tuple[float, torch.Tensor]:
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=engine.pad_id,
                **options,
            )
        return time.perf_counter() - started, out[:, ids.shape[1] :]

    rows: dict[str, Any] = {}
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=2, do_sample=False, pad_token_id=engine.pad_id)
    print(f"warm-up {time.perf_counter() - started:.1f} s", flush=True)

    seconds, dynamic_out = generate(cache_implementation="dynamic")
    rows["dynamic cache, eager"] = {"seconds": round(seconds, 1)}
    print(rows, flush=True)
    seconds, static_out = generate(cache_implementation="static", disable_compile=True)
    rows["static cache, eager"] = {
        "seconds": round(seconds, 1),
        "differing_responses": int((static_out != dynamic_out).any(dim=1).sum()),
    }
    print(rows, flush=True)
    compile_config = CompileConfig(mode="default", dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    first, _ = generate(cache_implementation="static", compile_config=compile_config)
    seconds, compiled_out = generate(cache_implementation="static", compile_config=compile_config)
    rows["static cache, torch.compile"] = {
        "seconds": round(seconds, 1),
        "first_call_s": round(first, 1),
        "differing_responses": int((compiled_out != dynamic_out).any(dim=1).sum()),
    }
    print(rows, flush=True)

    reference_python = REFERENCE_VENV / "bin" / "python"
    judge = MarkerJudge(reference_default_markers(reference_python) if reference_python.exists() else settings.refusal_markers)
    evaluator = Evaluator(engine, judge, prompts, prompts, tokens, True)
    started = time.perf_counter()
    evaluator.count_refusals()
    engine_s = time.perf_counter() - started
    results = {
        "machine": machine(),
        "command": "python -m bench.research.compile_lever",
        "prompts": len(prompts),
        "tokens": tokens,
        "batch_size": batch_size,
        "torch": torch.__version__,
        "variants": rows,
        "our_engine_trial_generation_s": round(engine_s, 1),
    }
    if not args.prompts:
        OUTPUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
