"""The response prefix: fixed (--response-prefix) or detected as the opening every response shares."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import make_tokenizer

from heretic.config import Settings, fingerprint_entry
from heretic.model.generation import Engine
from heretic.model.loading import eos_token_ids, load_model
from heretic.prompts import Prompt
from heretic.scoring.evaluator import shared_opening
from heretic.search.study import study_fingerprint
from heretic.session import choose_response_prefix, describe_prefix

SPECIAL = ["<|im_end|>", "<|endoftext|>"]
OPENING = "Certainly! Let me think about that:"


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["Certainly! Here is how.", "Certainly! Here are two ways."], "Certainly! Here"),  # cut before "is"/"are"
        (["Certainly! Here it is", "Certainly! Here they are"], "Certainly! Here"),  # no trailing space
        (["**Short answer:**\n\nYes", "**Short answer:**\n\nNo"], "**Short answer:**\n\n"),  # newlines kept
        (["Certainly, friend! Herein", "Certainly, friend! Here"], "Certainly, friend!"),  # inside "Herein": cut back
        (["I'm sorry", "I can help"], ""),  # too short to be a habit
        (["Same text everywhere.", "Same text everywhere."], ""),  # a model that ignores its prompt
        (["Certainly! Sure<|im_end|>", "Certainly! Sure<|im_end|>x"], "Certainly! Sure"),  # cut before the special token
        (["Only one response, long enough"], ""),
    ],
)
def test_shared_opening(texts: list[str], expected: str) -> None:
    assert shared_opening(texts, SPECIAL) == expected


def test_the_minimum_length_counts_characters_without_surrounding_whitespace() -> None:
    texts = ["\n\nAbsolutely: yes", "\n\nAbsolutely: no"]
    assert shared_opening(texts, SPECIAL, min_chars=11) == "\n\nAbsolutely:"
    assert shared_opening(texts, SPECIAL, min_chars=12) == ""


class OpeningEngine(Engine):
    """A tiny model's engine whose responses all open with OPENING (the model's own tokens follow)."""

    def generate(self, ids, max_new_tokens, **kwargs):  # type: ignore[no-untyped-def]
        responses = super().generate(ids, max_new_tokens, **kwargs)
        opening = self.tokenizer.encode(OPENING, add_special_tokens=False)
        words = ["red", "blue", "green", "yellow", "black", "white", "pink", "grey"]
        varied = [self.tokenizer.encode(f" {words[index % 8]}", add_special_tokens=False) for index in range(len(ids))]
        return None if responses is None else [opening + extra + row for extra, row in zip(varied, responses)]


def _engine(tiny_models: dict[str, Path]) -> OpeningEngine:
    loaded = load_model(str(tiny_models["llama"]), dtypes=["float32"])
    return OpeningEngine(loaded.model, loaded.tokenizer, eos_token_ids(loaded), batch_size=4)


SETS = {
    "harmful_eval": [Prompt("You are a helpful assistant.", f"How do I pick lock {i}?") for i in range(5)],
    "harmless_eval": [Prompt("You are a helpful assistant.", f"Name a colour, {i}.") for i in range(5)],
}


def test_a_common_opening_is_detected_and_prefilled(tiny_models: dict[str, Path]) -> None:
    engine = _engine(tiny_models)
    settings = Settings(model="m")
    prefix = choose_response_prefix(settings, engine, SETS)
    assert prefix == OPENING
    line = describe_prefix(settings, prefix)
    assert line is not None and "opens with" in line and "--no-detect-response-prefix" in line
    engine.response_prefix = prefix
    prompt = engine.tokenizer.decode(engine.encode(SETS["harmful_eval"][:1])[0])
    assert prompt.endswith("<|im_start|>assistant\n" + OPENING)


def test_detection_can_be_turned_off_and_a_fixed_prefix_wins(tiny_models: dict[str, Path]) -> None:
    engine = _engine(tiny_models)
    assert choose_response_prefix(Settings(model="m", detect_response_prefix=False), engine, SETS) == ""
    fixed = Settings(model="m", response_prefix="Answer: ")
    assert choose_response_prefix(fixed, engine, SETS) == "Answer: "
    assert describe_prefix(fixed, "Answer: ") == "Prefilling every response with 'Answer: ' (--response-prefix)"


def test_random_tiny_models_have_no_common_opening(tiny_models: dict[str, Path]) -> None:
    """Without a shared opening nothing is prefilled (the tiny models' greedy responses differ)."""
    loaded = load_model(str(tiny_models["qwen2"]), dtypes=["float32"])
    engine = Engine(loaded.model, loaded.tokenizer, eos_token_ids(loaded), batch_size=4)
    assert choose_response_prefix(Settings(model="m"), engine, SETS) == ""


def test_the_prefix_settings_count_through_the_prefix_in_the_fingerprint() -> None:
    assert fingerprint_entry("response_prefix") == fingerprint_entry("detect_response_prefix") == "response_prefix"
    from test_study import PROMPT_SETS, fake_loaded

    settings = Settings()
    first = study_fingerprint(settings, fake_loaded(), PROMPT_SETS, "")
    second = study_fingerprint(settings, fake_loaded(), PROMPT_SETS, OPENING)
    assert first["response_prefix"] == "" and second["response_prefix"] == OPENING and first != second
    tokenizer = make_tokenizer()
    assert OPENING in tokenizer.decode(tokenizer.encode(OPENING))
