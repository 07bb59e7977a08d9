from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network: the Hub is offline for transformers, datasets and huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import KINDS, save_tiny  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders of tiny random models, one per family (built lazily, once per session)."""
    root = tmp_path_factory.mktemp("tiny-models")

    class Lazy(dict):
        def __missing__(self, kind: str) -> Path:
            path = save_tiny(kind, root / kind)
            self[kind] = path
            return path

    return Lazy()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test runs in its own working directory with no HERETIC_* environment (but float32) and its own cache."""
    for key in list(os.environ):
        if key.startswith("HERETIC_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HERETIC_CACHE_DIR", str(tmp_path / "cache"))
    # Deterministic scores: the measured dtype ("fastest") could differ between two test processes.
    monkeypatch.setenv("HERETIC_DTYPES", '["float32"]')


def pytest_report_header() -> list[str]:
    return [f"tiny model families: {', '.join(KINDS)}"]
