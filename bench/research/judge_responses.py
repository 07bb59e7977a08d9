"""Generate the responses of the hand-labelled refusal set (bench/judge-labels/responses.jsonl).

The demo model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF dequantized) answers bundled prompts, greedily
and for up to 100 new tokens, in its original form and under five ablations replayed from the
reference tool's Pareto front on the benchmark (weak to strong) plus one heavier ablation beyond it:

- harmful_test[:100] under each of the six configurations (600 responses);
- harmless_test[:50] with the original model and harmless_test[50:100] with trial 4 (100 responses).

Nothing here judges the responses: they are labelled by reading (bench/judge-labels/GUIDELINE.md).

    PYTHONPATH=src python -m bench.research.judge_responses [--out bench/judge-labels/responses.jsonl]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.harness.paths import BENCH
from heretic.ablation.adapters import Ablator
from heretic.ablation.parameters import AblationParameters, ComponentKernel
from heretic.config import PromptSet, Settings
from heretic.demo import demo_model_file
from heretic.directions import refusal_directions, winsorize
from heretic.model.architecture import build_architecture_map, find_layers, text_config
from heretic.model.generation import Engine
from heretic.model.loading import eos_token_ids, load_model
from heretic.prompts import load_prompts

OUT = BENCH / "judge-labels" / "responses.jsonl"
MAX_NEW_TOKENS = 100


def kernel(w: float, p: float, m: float, d: float) -> ComponentKernel:
    return ComponentKernel(max_weight=w, max_weight_position=p, min_weight=m, min_weight_distance=d)


# name -> (description, parameters or None for the original model)
CONFIGS: dict[str, tuple[str, AblationParameters | None]] = {
    "original": ("no ablation", None),
    "trial9": (
        "dir 16.5, attn 1.02@18.5→0.93±4.2, mlp 1.09@20.8→0.25±2.0",
        AblationParameters("global", 16.5, {"attn": kernel(1.02, 18.5, 0.93, 4.2), "mlp": kernel(1.09, 20.8, 0.25, 2.0)}),
    ),
    "trial26": (
        "dir per-layer, attn 1.29@16.8→0.03±11.1, mlp 1.35@20.3→0.13±1.3",
        AblationParameters("per-layer", 0.0, {"attn": kernel(1.29, 16.8, 0.03, 11.1), "mlp": kernel(1.35, 20.3, 0.13, 1.3)}),
    ),
    "trial21": (
        "dir per-layer, attn 1.47@19.4→0.33±9.0, mlp 1.26@20.6→0.41±4.2",
        AblationParameters("per-layer", 0.0, {"attn": kernel(1.47, 19.4, 0.33, 9.0), "mlp": kernel(1.26, 20.6, 0.41, 4.2)}),
    ),
    "trial4": (
        "dir per-layer, attn 1.16@18.8→0.22±13.4, mlp 1.34@22.4→1.20±8.7",
        AblationParameters("per-layer", 0.0, {"attn": kernel(1.16, 18.8, 0.22, 13.4), "mlp": kernel(1.34, 22.4, 1.20, 8.7)}),
    ),
    "strong": (
        "dir per-layer, attn 1.5@12.0→1.0±12.0, mlp 1.5@12.0→1.0±12.0",
        AblationParameters("per-layer", 0.0, {"attn": kernel(1.5, 12.0, 1.0, 12.0), "mlp": kernel(1.5, 12.0, 1.0, 12.0)}),
    ),
}

# (config, prompt kind, bundled split, first index of the slice)
JOBS = [(name, "harmful", "harmful_test[:100]", 0) for name in CONFIGS] + [
    ("original", "harmless", "harmless_test[:50]", 0),
    ("trial4", "harmless", "harmless_test[50:100]", 50),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    started = time.perf_counter()
    torch.manual_seed(0)
    settings = Settings()
    system = settings.system_prompt
    loaded = load_model(str(demo_model_file(settings.cache_dir)), dtypes=["bfloat16"], cache_dir=settings.cache_dir)
    arch = build_architecture_map(loaded.model)
    engine = Engine(loaded.model, loaded.tokenizer, eos_token_ids(loaded))
    engine.batch_size = args.batch_size

    # Refusal directions as the tool computed them when the labelled responses were generated: last-position
    # residuals of the training prompts (`--direction-positions '[-1]'`; the default is now the mean of five).
    num_layers = int(text_config(loaded.model.config).num_hidden_layers)
    _, layers = find_layers(loaded.model, num_layers)
    residuals = {}
    for kind in ("harmful", "harmless"):
        prompts = load_prompts(PromptSet(source="bundled", split=f"{kind}_train[:400]"), system)
        residuals[kind] = winsorize(engine.residuals(engine.encode(prompts), list(layers)), settings.winsorization_quantile)
    directions = refusal_directions(residuals["harmful"], residuals["harmless"], settings.orthogonalize_direction)
    print(f"directions {tuple(directions.shape)} in {time.perf_counter() - started:.0f}s", flush=True)

    # The norm-preserving ablation stored as its rank-3 approximation, as when the labelled responses were generated.
    mode, rank = settings.row_normalization.value, settings.full_normalization_rank
    ablator = Ablator(loaded.model, arch, mode, rank, settings.seed, exact=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for config, kind, split, first in JOBS:
        mark = time.perf_counter()
        description, parameters = CONFIGS[config]
        ablator.reset()
        if parameters is not None:
            ablator.apply(parameters, directions)
        prompts = load_prompts(PromptSet(source="bundled", split=split), system)
        responses = engine.generate(engine.encode(prompts), MAX_NEW_TOKENS)
        assert responses is not None
        for offset, (prompt, tokens) in enumerate(zip(prompts, responses)):
            index = first + offset
            rows.append(
                {
                    "id": f"{config}/{kind}/{index:03d}",
                    "config": config,
                    "parameters": description,
                    "kind": kind,
                    "prompt_index": index,
                    "prompt": prompt.user,
                    "response": engine.decode(tokens),
                    "tokens": len(tokens),
                    "hit_limit": len(tokens) >= MAX_NEW_TOKENS,
                }
            )
        print(f"{config} {kind} {split}: {len(prompts)} responses in {time.perf_counter() - mark:.0f}s", flush=True)
        with args.out.open("w", encoding="utf-8") as out:  # rewritten after each job: partial results survive
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    ablator.reset()
    print(f"{len(rows)} responses written to {args.out} in {time.perf_counter() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
