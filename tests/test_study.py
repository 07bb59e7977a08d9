"""The study fingerprint: identical settings give the identical fingerprint across versions, so
existing checkpoints keep resuming."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from heretic.config import Settings
from heretic.search.study import study_fingerprint
from heretic.prompts import Prompt
from heretic.search import checkpoint

PROMPT_SETS = {
    name: [Prompt("You are a helpful assistant.", f"{name} {index}") for index in range(3)]
    for name in ("harmful", "harmless", "harmful_eval", "harmless_eval")
}


def fake_loaded(gguf_file: Path | None = None) -> SimpleNamespace:
    source = SimpleNamespace(name="org/model", gguf_file=gguf_file, display_name="model")
    return SimpleNamespace(source=source, dtype=torch.bfloat16)


def test_fingerprint_of_default_settings_is_pinned() -> None:
    values = study_fingerprint(Settings(), fake_loaded(), PROMPT_SETS, "")
    assert checkpoint.fingerprint(values) == "4cb24c8a0a307b05d9736f0d34c671f709357e5ee983c28d943174e5c74bf65b"


def test_fingerprint_of_changed_settings_is_pinned(tmp_path: Path) -> None:
    settings = Settings(model_revision="abc", refusal_scorer="x.py:J", seed=7, row_normalization="pre", multivariate_tpe=True)
    values = study_fingerprint(settings, fake_loaded(), PROMPT_SETS, "<think>\n\n</think>\n\n")
    assert checkpoint.fingerprint(values) == "5667b23aca2b3e2c67d2c6189f7a114c78a0cbbf0e3fee774d4d0764f7836b60"
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"0123456789")
    values = study_fingerprint(Settings(), fake_loaded(gguf), PROMPT_SETS, "")
    assert checkpoint.fingerprint(values) == "1df94ad75ee2b9bba68bb66462575f267d9d9d73c4555c1b582be35581bd16cb"
