"""The GPU memory a search needs, by model size: computed, not measured (heretic.model.footprint).

    python -m bench.gpu_memory        # prints the markdown table that docs/gpus.md holds

The configurations are those of the public models named (hidden size, MLP width, layers, attention and
key-value heads, vocabulary, tied embeddings), as their config.json files give them. The workload is a
default search's: batches of 64 of the evaluation prompts (the longest about 96 tokens with the chat
template), 100-token responses.
"""

from __future__ import annotations

import argparse

from heretic.model.footprint import Shape, search_memory

GIB = 2**30
BATCH, PROMPT, RESPONSE = 64, 96, 100

MODELS = {
    "Qwen2.5-0.5B-Instruct (the demo)": Shape(896, 4864, 24, 14, 2, 64, 151936, True),
    "Qwen2.5-7B-Instruct": Shape(3584, 18944, 28, 28, 4, 128, 152064, False),
    "Llama-3.1-8B-Instruct": Shape(4096, 14336, 32, 32, 8, 128, 128256, False),
    "Qwen2.5-14B-Instruct": Shape(5120, 13824, 48, 40, 8, 128, 152064, False),
    "Qwen2.5-32B-Instruct": Shape(5120, 27648, 64, 40, 8, 128, 152064, False),
    "Llama-3.1-70B-Instruct": Shape(8192, 28672, 80, 64, 8, 128, 128256, False),
}
# Bytes per weight: bfloat16; bitsandbytes NF4 (0.5 byte + one float32 absmax per 64 weights, itself
# quantized: about 0.53) and LLM.int8 (1 byte + a float32 scale per row).
DTYPES = {"bf16": 2.0, "bnb-8bit": 1.0, "bnb-4bit": 0.53}


def table() -> str:
    rows = [
        "| model | parameters | weights (bf16) | cache + activations + logits | kernels + adapters | search in bf16 | in bnb-8bit | in bnb-4bit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, shape in MODELS.items():
        totals = {kind: search_memory(shape, size, BATCH, PROMPT, RESPONSE) for kind, size in DTYPES.items()}
        terms = totals["bf16"]
        working = terms["cache"] + terms["activations"] + terms["logits"]
        fixed = terms["kernels"] + terms["adapters"]
        cells = [f"{sum(totals[kind].values()) / GIB:.1f} GiB" for kind in DTYPES]
        rows.append(
            f"| {name} | {shape.parameters / 1e9:.2f} B | {terms['weights'] / GIB:.1f} GiB | {working / GIB:.1f} GiB | "
            f"{fixed / GIB:.2f} GiB | " + " | ".join(cells) + " |"
        )
    return "\n".join(rows)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(table())


if __name__ == "__main__":
    main()
