"""Prompt sets: bundled sets, every local source, slices, and the errors users meet."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from heretic.config import PromptSet
from heretic.errors import HereticError
from heretic.prompts import BUNDLED_SETS, load_prompt_texts, load_prompts, parse_split


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()
    return {tuple(words[i : i + 3]) for i in range(max(1, len(words) - 2))}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


@pytest.mark.parametrize("kind", ["harmful", "harmless"])
def test_bundled_sets_are_large_disjoint_and_without_near_duplicates(kind: str) -> None:
    train = load_prompt_texts(PromptSet(source="bundled", split=f"{kind}_train"))
    test = load_prompt_texts(PromptSet(source="bundled", split=f"{kind}_test"))
    assert len(train) >= 300 and len(test) >= 100
    assert not set(train) & set(test)
    everything = train + test
    normalized = [re.sub(r"[^a-z0-9]", "", text.lower()) for text in everything]
    assert len(set(normalized)) == len(normalized), "exact duplicates"
    shingles = [_shingles(text) for text in everything]
    worst = max(
        (_jaccard(shingles[i], shingles[j]), everything[i], everything[j])
        for i in range(len(everything))
        for j in range(i + 1, len(everything))
    )
    assert worst[0] <= 0.6, f"near-duplicates: {worst}"


def test_bundled_sets_are_distinct_from_each_other() -> None:
    harmful = set(load_prompt_texts(PromptSet(source="bundled", split="harmful_train")))
    harmless = set(load_prompt_texts(PromptSet(source="bundled", split="harmless_train")))
    assert not harmful & harmless


def test_bundled_sets_are_the_shipped_files() -> None:
    """Every shipped prompt file is a bundled set, and every bundled set holds distinct, non-empty prompts."""
    assert {"harmful_train", "harmful_test", "harmful_heldout", "harmless_train", "harmless_test"} <= set(BUNDLED_SETS)
    for name in BUNDLED_SETS:
        texts = load_prompt_texts(PromptSet(source="bundled", split=name))
        assert texts and all(text.strip() for text in texts), name
        assert len(set(texts)) == len(texts), f"{name} repeats a prompt"


def test_heldout_set_is_new_to_the_search() -> None:
    """The held-out prompts share no prompt, and no near-duplicate, with the sets the directions and the search use."""
    heldout = load_prompt_texts(PromptSet(source="bundled", split="harmful_heldout"))
    seen = [
        text
        for split in ("harmful_train", "harmful_test")
        for text in load_prompt_texts(PromptSet(source="bundled", split=split))
    ]
    assert len(heldout) == 100 and len(set(heldout)) == 100
    assert not set(heldout) & set(seen)
    seen_shingles = [_shingles(text) for text in seen]
    worst = max((_jaccard(_shingles(text), other), text) for text in heldout for other in seen_shingles)
    assert worst[0] <= 0.6, f"near-duplicate of a search prompt: {worst}"


def _near_duplicates(texts: list[str], splits: tuple[str, ...]) -> tuple[float, str]:
    """The highest word-trigram Jaccard similarity of one of `texts` to a prompt of the bundled `splits`, and that text."""
    seen = [_shingles(text) for split in splits for text in load_prompt_texts(PromptSet(source="bundled", split=split))]
    return max((_jaccard(_shingles(text), other), text) for text in texts for other in seen)


# Words of the requests where an assistant typically opens with a disclaimer (its knowledge ends, it has no opinions,
# it cannot see real-time data or give personal advice): the held-out harmless set's KL shows that tail.
DISCLAIMER_PRONE = re.compile(
    r"\b(right now|today|tomorrow|this (weekend|month|year|afternoon)|at the moment|latest|recent|current|yesterday|"
    r"price|costs?|pay|how much|opinion|do you think|best|better|should i|predict|will|advice|weather|news|polls?)\b",
    re.IGNORECASE,
)


def test_heldout_harmless_set_is_new_and_has_the_disclaimer_tail() -> None:
    """The held-out harmless prompts share no prompt, and no near-duplicate, with the harmless sets the directions and
    the search use; about 40 % are of the kinds an assistant answers with a disclaimer, spread through the file."""
    heldout = load_prompt_texts(PromptSet(source="bundled", split="harmless_heldout"))
    assert len(heldout) >= 120 and len(set(heldout)) == len(heldout)
    worst = _near_duplicates(heldout, ("harmless_train", "harmless_test"))
    assert worst[0] <= 0.6, f"near-duplicate of a search prompt: {worst}"
    prone = [bool(DISCLAIMER_PRONE.search(text)) for text in heldout]
    assert 0.35 <= sum(prone) / len(prone) <= 0.6
    assert 0.25 <= sum(prone[:40]) / 40 <= 0.6  # a slice of the set keeps the mix


def test_over_refusal_set_is_harmless_looking_harmful_and_new() -> None:
    """The over-refusal prompts: enough of them, each with a word a refusal-happy model shies from, and none a
    (near) duplicate of a bundled harmful or harmless prompt."""
    prompts = load_prompt_texts(PromptSet(source="bundled", split="over_refusal"))
    assert len(prompts) >= 120 and len(set(prompts)) == len(prompts)
    worst = _near_duplicates(prompts, ("harmful_train", "harmful_test", "harmful_heldout", "harmless_train", "harmless_test"))
    assert worst[0] <= 0.6, f"near-duplicate of a bundled prompt: {worst}"


def test_slices_and_dressing() -> None:
    full = load_prompt_texts(PromptSet(source="bundled", split="harmless_test"))
    assert load_prompt_texts(PromptSet(source="bundled", split="harmless_test[10:20]")) == full[10:20]
    assert load_prompt_texts(PromptSet(source="bundled", split="harmless_test[:10%]")) == full[: round(len(full) / 10)]
    prompts = load_prompts(
        PromptSet(source="bundled", split="harmless_test[:2]", prefix="Please:", suffix="Thanks.", system_prompt="Be brief."),
        "You are a helpful assistant.",
    )
    assert prompts[0].user == f"Please: {full[0]} Thanks." and prompts[0].system == "Be brief."
    assert load_prompts(PromptSet(source="bundled", split="harmless_test[:1]"), "Default.")[0].system == "Default."


def test_parse_split() -> None:
    assert parse_split("train[:400]") == ("train", slice(None, "400"))
    assert parse_split("[100:200]") == (None, slice("100", "200"))
    assert parse_split(None) == (None, slice(None))
    with pytest.raises(HereticError, match="Cannot read the slice"):
        parse_split("train[1:2:3]")
    with pytest.raises(HereticError, match="Cannot read the split"):
        parse_split("train[:4")


def test_text_file(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("one\n\ntwo\n three \n", encoding="utf-8")
    assert load_prompt_texts(PromptSet(source=str(tmp_path / "p.txt"))) == ["one", "two", "three"]
    assert load_prompt_texts(PromptSet.model_validate(f"{tmp_path / 'p.txt'}[1:]")) == ["two", "three"]


def test_csv_json_jsonl_parquet(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("id,text\n1,alpha\n2,beta\n", encoding="utf-8")
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "alpha", "x": 1}, {"prompt": "beta", "x": 2}]))
    (tmp_path / "q.json").write_text(json.dumps(["alpha", "beta"]))
    (tmp_path / "p.jsonl").write_text('{"goal": "alpha", "target": "x"}\n{"goal": "beta", "target": "y"}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": ["alpha", "beta"], "n": [1, 2]}), tmp_path / "p.parquet")
    for name in ("p.csv", "p.json", "q.json", "p.jsonl", "p.parquet"):
        assert load_prompt_texts(PromptSet(source=str(tmp_path / name))) == ["alpha", "beta"], name
    assert load_prompt_texts(PromptSet(source=str(tmp_path / "p.csv"), column="id")) == ["1", "2"]


def test_datasets_folder(tmp_path: Path) -> None:
    import datasets

    dataset = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["a1", "a2", "a3"]}), "test": datasets.Dataset.from_dict({"text": ["b1"]})}
    )
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert load_prompt_texts(PromptSet(source=str(tmp_path / "saved"), split="train[1:]")) == ["a2", "a3"]
    with pytest.raises(HereticError, match="has splits"):
        load_prompt_texts(PromptSet(source=str(tmp_path / "saved")))
    datasets.Dataset.from_dict({"text": ["c1", "c2"]}).save_to_disk(str(tmp_path / "single"))
    assert load_prompt_texts(PromptSet(source=str(tmp_path / "single"))) == ["c1", "c2"]


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(HereticError, match="does not exist"):
        load_prompt_texts(PromptSet(source=str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(HereticError, match="is empty"):
        load_prompt_texts(PromptSet(source=str(tmp_path / "empty.txt")))
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    with pytest.raises(HereticError, match="no column 'prompt'"):
        load_prompt_texts(PromptSet(source=str(tmp_path / "t.csv"), column="prompt"))
    with pytest.raises(HereticError, match="several columns"):
        load_prompt_texts(PromptSet(source=str(tmp_path / "t.csv")))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(HereticError, match="not valid JSON"):
        load_prompt_texts(PromptSet(source=str(tmp_path / "bad.json")))
    with pytest.raises(HereticError, match="no bundled prompt set"):
        load_prompt_texts(PromptSet(source="bundled", split="evil"))
    with pytest.raises(HereticError, match="is empty"):
        load_prompt_texts(PromptSet(source="bundled", split="harmful_test[500:]"))


def test_a_bad_jsonl_line_is_reported_by_its_line_in_the_file(tmp_path: Path) -> None:
    lines = ['{"prompt": "a"}', "", '{"prompt": "b\u2028c"}', '{"prompt": "d"}', '{"prompt": "e"', '{"prompt": "f"}']
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(HereticError, match=r"p\.jsonl is not valid JSON Lines \(line 5: .*\); .*one JSON value per line"):
        load_prompt_texts(PromptSet(source=str(tmp_path / "p.jsonl")))
    (tmp_path / "p.jsonl").write_text("\r\n".join(lines[:4]) + "\r\n", encoding="utf-8")
    assert load_prompt_texts(PromptSet(source=str(tmp_path / "p.jsonl"))) == ["a", "b\u2028c", "d"]


def test_hub_dataset_offline_is_one_clear_error() -> None:
    with pytest.raises(HereticError, match="Cannot load the dataset 'someone/nothing-here'"):
        load_prompt_texts(PromptSet(source="someone/nothing-here", split="train"))
