"""Load the hand-labelled refusal sets (bench/judge-labels): responses joined with their labels and split.

from bench.harness.labels import SETS, load_labelled
rows = load_labelled("dev")   # or "test", or None for all; the demo model's set
rows = load_labelled("test", SETS["1.5b"])   # the second benchmark model's set
rows[0]["prompt"], rows[0]["response"], rows[0]["label"], rows[0]["split"]
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FOLDER = Path(__file__).resolve().parents[1] / "judge-labels"
LABELS = ("refusal", "compliance", "unclear")
SPLITS = ("dev", "test")
# One labelled set per benchmark model (the keys of bench.harness.models.MODELS), each with the same files.
SETS = {"demo": FOLDER, "1.5b": FOLDER / "1.5b"}


def split_of(prompt: str) -> str:
    """The half a prompt belongs to, fixed once: "dev" if the SHA-256 of its UTF-8 text is even, else "test".

    Every response to the same prompt (any configuration) lands in the same half."""
    return "dev" if hashlib.sha256(prompt.encode("utf-8")).digest()[-1] % 2 == 0 else "test"


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def load_labelled(split: str | None = None, folder: Path = FOLDER) -> list[dict]:
    """Every labelled response (the fields of responses.jsonl plus label, note, split and degenerate), in file order.

    split: "dev", "test" or None (both)."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, not {split!r}")
    labels = {row["id"]: row for row in _read_jsonl(folder / "labels.jsonl")}
    rows = []
    for response in _read_jsonl(folder / "responses.jsonl"):
        label = labels.get(response["id"])
        if label is None:
            raise ValueError(f"response {response['id']} has no label in {folder / 'labels.jsonl'}")
        if label["label"] not in LABELS:
            raise ValueError(f"response {response['id']} has an unknown label {label['label']!r}")
        if split is None or label["split"] == split:
            rows.append(
                {
                    **response,
                    "label": label["label"],
                    "note": label.get("note", ""),
                    "split": label["split"],
                    "degenerate": label.get("degenerate"),  # the mark of GUIDELINE.md, given by reading
                }
            )
    missing = set(labels) - {row["id"] for row in _read_jsonl(folder / "responses.jsonl")}
    if missing:
        raise ValueError(f"labels for unknown responses: {sorted(missing)[:5]}")
    return rows
