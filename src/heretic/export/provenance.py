"""Where a result comes from, as people know it: the base model's Hub id or published name (never a
local path) and the original model card (its text and licence), for the card and heretic.json."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..search.records import HUB_ID, hub_repo

log = logging.getLogger(__name__)

# A folder of the Hugging Face cache: .../models--<owner>--<name>/snapshots/<commit>
_HUB_CACHE = re.compile(r"models--([\w.-]+?)--([\w.-]+)/snapshots/")
_LICENSE_KEYS = ("license", "license_name", "license_link")


@dataclass(frozen=True)
class BaseModel:
    """The model a result was made from, named without any local path."""

    name: str  # the Hub id, else the published name (a GGUF's general.name), else the file or folder name
    hub_id: str | None = None  # a Hugging Face repository id, when one is known
    file: str | None = None  # the GGUF file name (no folder), for GGUF inputs
    parents: list[dict[str, str]] = field(default_factory=list)  # a GGUF's general.base_model.N: name, hub_id, url

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "hub_id": self.hub_id, "file": self.file, "base_models": self.parents}


def base_model(source: Any) -> BaseModel:
    """The base model of a loaded `source` (kind "hub", "local" or "gguf")."""
    if source.gguf_file is not None:
        return _gguf_base_model(Path(source.gguf_file))
    if source.kind == "hub":
        return BaseModel(source.name, source.name)
    return _folder_base_model(Path(source.path))


def _folder_base_model(folder: Path) -> BaseModel:
    """A local folder: a Hub cache snapshot's id, else a Hub id its config names, else the folder's name."""
    cached = _HUB_CACHE.search(str(folder.expanduser().resolve()) + "/")
    if cached:
        hub_id = f"{cached.group(1)}/{cached.group(2)}"
        return BaseModel(hub_id, hub_id)
    try:
        named = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_name_or_path") or ""
    except (OSError, ValueError, AttributeError):
        named = ""
    if isinstance(named, str) and HUB_ID.match(named) and not named.startswith((".", "/", "~")):
        return BaseModel(named, named)
    return BaseModel(folder.expanduser().resolve().name or "model")


def _gguf_base_model(path: Path) -> BaseModel:
    """A GGUF file: its repository URL if it names one, else general.name (or basename, size, fine-tune)."""
    fields = gguf_fields(path)
    hub_id = None
    for key in ("general.source.repo_url", "general.repo_url", "general.source.huggingface.repository", "general.source.url"):
        repo = hub_repo(str(fields.get(key, "")))
        if repo is not None:
            hub_id = repo[0]
            break
    parts = [fields.get(key) for key in ("general.basename", "general.size_label", "general.finetune")]
    name = hub_id or fields.get("general.name") or "-".join(str(p) for p in parts if p) or path.stem
    return BaseModel(str(name), hub_id, path.name, _gguf_parents(fields))


def _gguf_parents(fields: dict[str, Any]) -> list[dict[str, str]]:
    """general.base_model.N.*: the models the GGUF's model was itself made from."""
    parents = []
    for index in range(int(fields.get("general.base_model.count", 0) or 0)):
        prefix = f"general.base_model.{index}."
        url = str(fields.get(prefix + "repo_url") or fields.get(prefix + "url") or "")
        repo = hub_repo(url) if url else None
        organization, name = fields.get(prefix + "organization"), fields.get(prefix + "name")
        entry = {"name": str(repo[0] if repo else " / ".join(str(p) for p in (organization, name) if p) or f"model {index}")}
        if repo:
            entry["hub_id"] = repo[0]
        if url:
            entry["url"] = url
        parents.append(entry)
    return parents


def gguf_fields(path: Path) -> dict[str, Any]:
    """The general.* metadata of a GGUF file (empty if it cannot be read)."""
    from ..model.loading import gguf_general_fields  # (transformers and torch: only when a GGUF is read)

    try:
        return gguf_general_fields(path)
    except Exception as error:  # noqa: BLE001 - an unreadable file names nothing
        log.info("Could not read the metadata of %s (%s)", path.name, error)
        return {}


# --------------------------------------------------------------------------------------------------
# The original model card


@dataclass(frozen=True)
class OriginalCard:
    """The original model's card: its licence fields (front matter) and its text (without front matter)."""

    license: dict[str, str] = field(default_factory=dict)  # license, license_name, license_link
    text: str = ""


def original_card(source: Any) -> OriginalCard:
    """The original's card: a Hub model's README, a local folder's README.md, or a GGUF's general.license."""
    try:
        if source.gguf_file is not None:
            license_name = gguf_fields(Path(source.gguf_file)).get("general.license")
            return OriginalCard({"license": str(license_name)} if license_name else {})
        if source.kind == "local":
            readme = Path(source.path) / "README.md"
            return parse_card(readme.read_text(encoding="utf-8")) if readme.is_file() else OriginalCard()
        from huggingface_hub import ModelCard

        return parse_card(ModelCard.load(source.name).content)
    except Exception as error:  # noqa: BLE001 - offline Hub, unreadable card: no card then
        log.info("No original card found for %s (%s)", source.name, error)
        return OriginalCard()


def parse_card(content: str) -> OriginalCard:
    """Split a model card into its licence fields and its text."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(?:\n|$)", content, re.DOTALL)
    front, text = (match.group(1), content[match.end() :]) if match else ("", content)
    found = {}
    for key in _LICENSE_KEYS:
        value = re.search(rf"^{key}:\s*(.+?)\s*$", front, re.MULTILINE)
        if value and value.group(1).strip("'\""):
            found[key] = value.group(1).strip("'\"")
    return OriginalCard(found, text.strip())
