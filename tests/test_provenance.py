"""Provenance of a result (fast, no model run): the base model named as people know it, never by a local
path; the original card kept under ours; the install line; weight hashes and their check on reproduction;
records from the Hub; what an upload sends."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from types import SimpleNamespace

import gguf
import pytest

from heretic.config import Settings
from heretic.errors import HereticError
from heretic.export import card, record, reproduce, upload
from heretic.export.provenance import BaseModel, base_model, hub_repo, original_card, parse_card

ROOT = Path(__file__).resolve().parents[1]


def source(kind: str, name: str, path: str | None = None, gguf_file: Path | None = None) -> SimpleNamespace:
    return SimpleNamespace(kind=kind, name=name, path=path or name, gguf_file=gguf_file)


def write_gguf(path: Path, **fields: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in fields.items():
        name = "general." + key.replace("__", ".")
        if isinstance(value, int):
            writer.add_uint32(name, value)
        else:
            writer.add_string(name, str(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", ("Qwen/Qwen2.5-0.5B-Instruct", None)),
        ("https://huggingface.co/user/model-heretic", ("user/model-heretic", None)),
        ("https://huggingface.co/user/model/blob/v2/heretic.json", ("user/model", "v2")),
        ("https://hf.co/user/model/tree/main", ("user/model", "main")),
        ("https://huggingface.co/datasets/user/data", None),
        ("https://example.com/user/model", None),
        ("./model.gguf", None),
        ("model", None),
    ],
)
def test_hub_repo(text: str, expected) -> None:
    assert hub_repo(text) == expected


def test_gguf_metadata_is_read_once_per_file_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GGUF reader parses the whole header (seconds for a large vocabulary): the completeness check at load,
    the card and the record share one read, and a rewritten file is read again."""
    import os

    from heretic.model import loading

    path = write_gguf(tmp_path / "m.gguf", name="First")
    reads: list[str] = []
    real = gguf.GGUFReader

    def counting(file: object, *args: object, **kwargs: object) -> gguf.GGUFReader:
        reads.append(str(file))
        return real(file, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    loading._read_gguf_general.cache_clear()
    for _ in range(3):
        assert base_model(source("gguf", str(path), gguf_file=path)).name == "First"
    assert len(reads) == 1
    write_gguf(path, name="Second")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert base_model(source("gguf", str(path), gguf_file=path)).name == "Second"
    assert len(reads) == 2


def test_gguf_base_model_is_named_by_its_metadata_never_its_path(tmp_path: Path) -> None:
    demo_like = write_gguf(tmp_path / "home" / "x.gguf", name="Qwen2.5 Coder 0.5B Instruct AWQ", basename="Qwen2.5-Coder")
    named = base_model(source("gguf", str(demo_like), gguf_file=demo_like))
    assert named == BaseModel("Qwen2.5 Coder 0.5B Instruct AWQ", None, "x.gguf", [])

    rich = write_gguf(
        tmp_path / "y.gguf",
        name="Smol Instruct",
        repo_url="https://huggingface.co/org/smol-instruct",
        base_model__count=1,
        base_model__0__name="Smol",
        base_model__0__organization="Org",
        base_model__0__repo_url="https://huggingface.co/org/smol",
    )
    named = base_model(source("gguf", str(rich), gguf_file=rich))
    assert named.hub_id == named.name == "org/smol-instruct"
    assert named.parents == [{"name": "org/smol", "hub_id": "org/smol", "url": "https://huggingface.co/org/smol"}]

    bare = write_gguf(tmp_path / "z.gguf", basename="llama", size_label="1B", finetune="chat")
    assert base_model(source("gguf", str(bare), gguf_file=bare)).name == "llama-1B-chat"


def test_folder_base_model(tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--Org--Some-Model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert base_model(source("local", str(snapshot))) == BaseModel("Org/Some-Model", "Org/Some-Model")
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "Org/Original"}))
    assert base_model(source("local", str(folder))).hub_id == "Org/Original"
    (folder / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path / "elsewhere")}))
    assert base_model(source("local", str(folder))) == BaseModel("my-model")
    assert base_model(source("hub", "Org/Hubbed")) == BaseModel("Org/Hubbed", "Org/Hubbed")


ORIGINAL_CARD = """---
license: other
license_name: gemma
license_link: https://ai.google.dev/gemma/terms
tags:
- text-generation
---

# Original model

Use it under the Gemma terms.
"""


def test_parse_card_and_local_original_card(tmp_path: Path) -> None:
    parsed = parse_card(ORIGINAL_CARD)
    assert parsed.license == {"license": "other", "license_name": "gemma", "license_link": "https://ai.google.dev/gemma/terms"}
    assert parsed.text == "# Original model\n\nUse it under the Gemma terms."
    (tmp_path / "README.md").write_text(ORIGINAL_CARD)
    assert original_card(source("local", str(tmp_path))) == parsed
    assert original_card(source("local", str(tmp_path / "none"))).text == ""


def minimal_record(model: dict, kind: str = "merged") -> dict:
    return {
        "model": model,
        "trial": {
            "number": 3,
            "refusals": 2,
            "refusals_is_lower_bound": False,
            "kl": 0.1234,
            "parameters": {"direction_scope": "per-layer", "direction_index": 1.0, "kernels": {}},
        },
        "baseline": {"refusals": 9, "n_prompts": 10},
        "settings": {"row_normalization": "none", "full_normalization_rank": 1, "judge": "markers"},
        "prompt_sets": {},
        "saved": {"kind": kind, "weights": {}},
    }


def test_card_names_the_base_model_keeps_the_original_and_installs_from_the_repository() -> None:
    hub = minimal_record({"name": "Org/Model", "hub_id": "Org/Model", "file": None, "base_models": []})
    text = card.render_card(hub, parse_card(ORIGINAL_CARD))
    front = text.split("---")[1]
    assert "base_model: Org/Model" in front and "license: other" in front and "license_name: gemma" in front
    assert "[Org/Model](https://huggingface.co/Org/Model)" in text
    ours, theirs = text.split("## Original model card")
    assert "## Results" in ours and "Use it under the Gemma terms." in theirs
    assert card.INSTALL in text and "pip install heretic\n" not in text

    gguf_record = minimal_record({"name": "Qwen2.5 Coder 0.5B", "hub_id": None, "file": "q.gguf", "base_models": []}, "adapter")
    text = card.render_card(gguf_record, None)
    assert "base_model:" not in text and "library_name: peft" in text and "`q.gguf`" in text
    assert "/root" not in text and "~" not in text and "## Original model card" not in text


def test_install_line_agrees_with_pyproject_and_readme() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["urls"]["Homepage"] == card.REPOSITORY
    assert card.INSTALL in (ROOT / "README.md").read_text()


def test_recorded_settings_hold_no_local_path(tmp_path: Path) -> None:
    settings = json.loads(
        Settings(model=str(tmp_path / "m.gguf"), output_dir=str(tmp_path / "out"), judge_model=str(tmp_path)).model_dump_json()
    )
    public = record.public_settings(settings, "Org/Model")
    assert public["model"] == "Org/Model" and public["judge_model"] == tmp_path.name
    assert str(tmp_path) not in json.dumps(public)


# --------------------------------------------------------------------------------------------------
# Weight hashes and their check


def test_weight_digests_and_mismatches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "model-00001.safetensors").write_bytes(b"a" * 10)
    (tmp_path / "config.json").write_text("{}")
    digests = record.weight_digests(tmp_path)
    assert list(digests) == ["model-00001.safetensors"] and digests["model-00001.safetensors"]["size"] == 10
    data = {"saved": {"kind": "merged", "weights": digests}}
    reproduce.check_weights(data, tmp_path, ignore_mismatches=False)
    assert "All 1 weight files match" in capsys.readouterr().out

    (tmp_path / "model-00001.safetensors").write_bytes(b"b" * 12)
    with pytest.raises(HereticError) as caught:
        reproduce.check_weights(data, tmp_path, ignore_mismatches=False)
    message = str(caught.value)
    assert "model-00001.safetensors" in message and "10 bytes" in message and "12 bytes" in message
    assert "--ignore-mismatches" in message and "\n" not in message
    reproduce.check_weights(data, tmp_path, ignore_mismatches=True)  # reported, not an error
    assert "accepted" in capsys.readouterr().out

    (tmp_path / "model-00002.safetensors").write_bytes(b"c")
    rows = reproduce.weight_mismatches(digests, record.weight_digests(tmp_path))
    assert [(name, new == "missing" or old == "missing") for name, old, new in rows] == [
        ("model-00001.safetensors", False),
        ("model-00002.safetensors", True),
    ]


def test_record_from_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    local = tmp_path / "downloaded.json"
    local.write_text("{}")
    calls = []

    def download(repo_id, filename, revision=None):
        calls.append((repo_id, filename, revision))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert reproduce.locate_record("user/model-heretic") == local
    assert reproduce.locate_record("https://huggingface.co/user/model-heretic/blob/v1/heretic.json") == local
    assert calls == [("user/model-heretic", "heretic.json", None), ("user/model-heretic", "heretic.json", "v1")]

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(HereticError, match="Could not download heretic.json from the Hugging Face repository user/x") as caught:
        reproduce.locate_record("user/x")
    assert "\n" not in str(caught.value)


def test_model_to_rebuild_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = Settings()
    assert reproduce.recorded_model(plain, {"model": {"kind": "hub", "name": "Org/M", "hub_id": "Org/M"}}) == "Org/M"
    assert reproduce.recorded_model(Settings(model="mine.gguf"), {"model": {"kind": "gguf", "name": "x"}}) == "mine.gguf"
    monkeypatch.setattr(reproduce, "demo_model_file", lambda cache: tmp_path / "demo.gguf")
    demo = {"model": {"kind": "gguf", "name": "Qwen", "file": reproduce.DEMO_NAME}}
    assert reproduce.recorded_model(plain, demo) == str(tmp_path / "demo.gguf")
    with pytest.raises(HereticError, match=r"loaded from the file other\.gguf; give your copy with --model PATH"):
        reproduce.recorded_model(plain, {"model": {"kind": "gguf", "name": "Other", "file": "other.gguf"}})


# --------------------------------------------------------------------------------------------------
# Upload


def test_upload_with_and_without_the_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    (tmp_path / "adapter_model.safetensors").write_bytes(b"w")
    (tmp_path / "heretic.json").write_text("{}")
    hub = minimal_record({"name": "Org/Model", "hub_id": "Org/Model", "file": None, "base_models": []}, "adapter")
    (tmp_path / "README.md").write_text(card.render_card(hub, parse_card(ORIGINAL_CARD)))
    commits = []

    class FakeApi:
        def __init__(self, token):
            assert token == "hf_test"

        def create_repo(self, repo_id, **kwargs):
            pass

        def create_commit(self, repo_id, operations, **kwargs):
            commits.append({op.path_in_repo: op.path_or_fileobj for op in operations})

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    upload.upload_folder(tmp_path, "user/model", True, False)
    upload.upload_folder(tmp_path, "user/model", True, False, include_record=False)
    assert sorted(commits[0]) == ["README.md", "adapter_model.safetensors", "heretic.json"]
    assert sorted(commits[1]) == ["README.md", "adapter_model.safetensors"]
    trimmed = commits[1]["README.md"].decode()
    assert "## Reproduce" not in trimmed and "heretic.json" not in trimmed
    assert "## Caution" in trimmed and "Use it under the Gemma terms." in trimmed
