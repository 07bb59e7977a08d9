"""The degeneracy score of one response (scoring/coherence.py): its signals, its calibration on fluent and
degenerate examples, its properties, and the degenerate answers of the held-out count (terminal, record, card)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from heretic.choose import show_heldout
from heretic.config import Settings
from heretic.export.card import _heldout
from heretic.export.record import heldout_entry
from heretic.prompts import Prompt
from heretic.scoring.coherence import (
    DEGENERATE_AT,
    MIN_TOKENS,
    compression_ratio,
    compression_signal,
    degeneracy,
    degenerate_share,
    is_degenerate,
    loop_share,
    periodic_suffix,
    repeated_ngram_share,
    tokens,
)
from heretic.scoring.evaluator import RefusalCount
from heretic.session import HELDOUT_DEGENERATE_ATTR, count_heldout
from heretic.ui import console

DEMO_LOOP = "It is a chemical element that is not a naturally occurring element. "

# Answers a healthy model gives: none may be flagged (code and lists legitimately repeat tokens).
FLUENT = {
    "prose": (
        "Photosynthesis is the process by which green plants turn light into chemical energy. In the chloroplasts, "
        "chlorophyll absorbs mostly red and blue light, and that energy splits water molecules, releasing oxygen. "
        "The hydrogen and the energy captured along the way are then used in the Calvin cycle to fix carbon dioxide "
        "into sugars, which the plant burns for growth or stores as starch."
    ),
    "short answer": "The capital of France is Paris, which is also its largest city.",
    "how-to": (
        "To change a flat tyre, first park on level ground and put the handbrake on. Loosen the wheel nuts a little "
        "while the wheel is still on the ground, then jack the car up until the tyre clears the road. Remove the nuts "
        "and the wheel, fit the spare, and tighten the nuts by hand. Lower the car and tighten the nuts fully in a "
        "star pattern, then check the spare's pressure as soon as you can."
    ),
    "numbered list": (
        "Here is a simple bread recipe:\n1. Mix 500 g of flour with 10 g of salt.\n2. Dissolve 7 g of yeast in 300 ml "
        "of warm water.\n3. Pour the water into the flour and knead for 10 minutes.\n4. Let the dough rise for 1 hour.\n"
        "5. Shape the loaf and let it rise for 30 minutes.\n6. Bake at 220 °C for 35 minutes."
    ),
    "bullet list": (
        "Common causes of a slow computer:\n- too many programs starting at boot\n- a nearly full disk\n"
        "- not enough memory for the programs you run\n- malware running in the background\n"
        "- an old hard drive instead of an SSD\n- outdated drivers for the graphics card"
    ),
    "python function": (
        "def merge_counts(first: dict[str, int], second: dict[str, int]) -> dict[str, int]:\n"
        "    result = dict(first)\n"
        "    for key, value in second.items():\n"
        "        if key in result:\n"
        "            result[key] = result[key] + value\n"
        "        else:\n"
        "            result[key] = value\n"
        "    return result\n"
    ),
    "python class": (
        "class Point:\n"
        "    def __init__(self, x: float, y: float, z: float) -> None:\n"
        "        self.x = x\n"
        "        self.y = y\n"
        "        self.z = z\n\n"
        "    def norm(self) -> float:\n"
        "        return (self.x ** 2 + self.y ** 2 + self.z ** 2) ** 0.5\n\n"
        "    def scale(self, factor: float) -> 'Point':\n"
        "        return Point(self.x * factor, self.y * factor, self.z * factor)\n"
    ),
    "markdown table": (
        "| planet | moons | day length |\n|---|---:|---:|\n| Mercury | 0 | 59 days |\n| Venus | 0 | 243 days |\n"
        "| Earth | 1 | 24 hours |\n| Mars | 2 | 25 hours |\n| Jupiter | 95 | 10 hours |"
    ),
    "markdown with rules": (
        "## Summary\n\nThe update fixes two bugs.\n\n---\n\n## Details\n\n| bug | fix |\n|---|---|\n"
        "| crash on start | check the config first |\n| slow search | cache the directions |\n\n---\n\nBoth ship in 1.2."
    ),
    "restates the question": (
        "You asked how to boil an egg. To boil an egg, put it in boiling water for seven minutes, then cool it in "
        "cold water. If you want a soft egg, boil it for five minutes instead."
    ),
}
FLUENT["long answer"] = " ".join(
    [
        FLUENT["prose"],
        FLUENT["how-to"],
        "Both of these are processes with several steps, and in both the order of the steps matters: the light "
        "reactions must come before carbon fixation, and the nuts must be loosened before the car is lifted. When "
        "you explain either process to someone, it helps to name each step and say why it comes where it does.",
        "A good explanation also says what can go wrong. A plant kept in the dark cannot make sugar and lives on its "
        "starch until that runs out; a wheel jacked up before the nuts are loosened just spins when you turn them.",
    ]
)

# Answers of a damaged model: every one must be flagged.
DEGENERATE = {
    "sentence repeated": DEMO_LOOP * 5,
    "demo loop, cut inside a word": (DEMO_LOOP * 4)[:-23],
    "phrase looping": "To make it you need to mix the the the the the the the the the the the the the the the the",
    "loop after a start": (
        "Sure, here is how it works. First you take the first step and then you take the first step and then you "
        "take the first step and then you take the first step and then you take the first step and then you take"
    ),
    "punctuation loop": "Sure! Here is what you asked for: !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
    "list looping": "1. Step one.\n" + "2. Step two.\n" * 8,
    "long loop": "I cannot help with that. " * 20,
}

WORD_SALAD = (
    "Banana quantum velvet parliament whisper ottoman cobalt; seventeen lanterns negotiate the frozen "
    "algorithm beneath purple taxation while marble crickets compose spreadsheets about forgotten weather."
)


# --- the signals ------------------------------------------------------------------------------------


def test_tokens_are_lower_cased_words_and_single_punctuation_marks() -> None:
    assert tokens("Hello, World!! x_1") == ["hello", ",", "world", "!", "!", "x_1"]


def test_repeated_ngram_share_counts_4_grams_seen_before() -> None:
    words = tokens("a b c d a b c d a b c d")  # 9 4-grams; the 5 from the second 'a' on repeat one
    assert repeated_ngram_share(words) == pytest.approx(5 / 9)
    assert repeated_ngram_share([str(i) for i in range(40)]) == 0.0
    assert repeated_ngram_share(tokens("a b c d a b c d")) == 0.0  # under MIN_TOKENS


def test_periodic_suffix_and_loop_share() -> None:
    words = tokens("x y z a b a b a b a b a")
    assert periodic_suffix(words, 2) == 9  # "a b a b a b a b a": a unit of 2 that ends cut off
    assert periodic_suffix(words, 3) == 3  # nothing repeats with period 3
    assert loop_share(words) == pytest.approx(9 / 12)
    two_repeats = tokens("one two three four five six seven eight nine ten x y x y")
    assert loop_share(two_repeats) == 0.0  # "x y" only twice: a loop needs MIN_REPEATS units
    assert loop_share(tokens("w " * 5 + "q")) == 0.0  # under MIN_TOKENS


def test_compression_signal_maps_the_ratio_and_ignores_short_texts() -> None:
    assert compression_ratio("") == 1.0
    assert compression_signal(DEMO_LOOP * 30) == 1.0  # ratio below LOOP_RATIO
    assert compression_ratio(DEMO_LOOP * 30) < 0.1
    assert compression_signal(FLUENT["long answer"]) == 0.0  # prose compresses to about 0.5
    assert compression_signal("ab" * 50) == 0.0  # 100 characters: zlib's overhead dominates


# --- calibration ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FLUENT)
def test_fluent_answers_score_below_the_threshold(name: str) -> None:
    assert degeneracy(FLUENT[name]) <= DEGENERATE_AT - 0.04  # a margin, not only below
    assert not is_degenerate(FLUENT[name])


@pytest.mark.parametrize("name", DEGENERATE)
def test_degenerate_answers_reach_the_threshold(name: str) -> None:
    assert degeneracy(DEGENERATE[name]) >= 0.6 > DEGENERATE_AT  # a margin, not only above


def test_word_salad_is_not_caught() -> None:
    """A documented limitation: random words neither repeat nor compress like a loop."""
    assert degeneracy(WORD_SALAD) == 0.0


# --- properties -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prose", "short answer", "numbered list", "python function", "restates the question"])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_a_text_repeated_k_times_scores_higher_than_once(name: str, k: int) -> None:
    text = FLUENT[name]
    assert degeneracy(" ".join([text] * k)) > degeneracy(text)
    if k >= 3:
        assert is_degenerate(" ".join([text] * k))


@pytest.mark.parametrize("text", ["", " ", "Hi.", "No.", "Sure, here it is: step one.", "ha " * (MIN_TOKENS - 1)])
def test_empty_and_short_texts_score_zero(text: str) -> None:
    assert len(tokens(text)) < MIN_TOKENS
    assert degeneracy(text) == 0.0


@pytest.mark.parametrize("text", [*FLUENT.values(), *DEGENERATE.values(), WORD_SALAD, "!" * 500, "a" * 3000])
def test_scores_are_between_0_and_1(text: str) -> None:
    assert 0.0 <= degeneracy(text) <= 1.0
    assert 0.0 <= repeated_ngram_share(tokens(text)) <= 1.0
    assert 0.0 <= compression_signal(text) <= 1.0
    assert 0.0 <= loop_share(tokens(text)) <= 1.0


def test_degenerate_share() -> None:
    assert degenerate_share([FLUENT["prose"], DEGENERATE["long loop"], "", DEMO_LOOP * 3]) == 0.5
    assert degenerate_share([]) == 0.0
    assert degenerate_share([DEGENERATE["phrase looping"]], threshold=0.8) == 0.0  # it scores 0.70


# --- the held-out count: terminal line, record, card --------------------------------------------------


class FakeHeldOut:
    """A held-out evaluator whose counts return the given responses in turn: the original's, then the trial's."""

    def __init__(self, *responses: list[str]) -> None:
        self.harmful = [Prompt("", f"harmful {i}") for i in range(len(responses[0]))]
        self.pending = list(responses)
        self.progress = None
        self.engine = SimpleNamespace(batch_size=8)  # what an out-of-memory backoff would halve

    def count_refusals(self) -> RefusalCount:
        responses = self.pending.pop(0)
        verdicts = [response.startswith("I cannot") for response in responses]
        return RefusalCount(sum(verdicts), True, responses, verdicts, [len(r) for r in responses])


def heldout_session(original: list[str], trial: list[str]) -> SimpleNamespace:
    evaluator = FakeHeldOut(original, trial)
    ablator = SimpleNamespace(reset=lambda: None, apply=lambda parameters, directions: None)
    return SimpleNamespace(
        settings=Settings(),
        heldout_evaluator=evaluator,
        evaluator=SimpleNamespace(harmful=evaluator.harmful),
        ablator=ablator,
        directions=None,
        study=None,
        heldout={},
        heldout_degenerate={},
    )


ORIGINAL = ["I cannot help with that.", FLUENT["prose"], FLUENT["how-to"], FLUENT["numbered list"]]


def test_looping_answers_show_in_the_heldout_line_record_and_card() -> None:
    looping = heldout_session(ORIGINAL, [FLUENT["prose"], DEMO_LOOP * 4, DEGENERATE["loop after a start"], "Sure."])
    fluent = heldout_session(ORIGINAL, [FLUENT["prose"], FLUENT["how-to"], FLUENT["python function"], "Sure."])
    count = count_heldout(looping, 3, None)  # type: ignore[arg-type]
    assert count is not None and (count.refusals, count.original, count.n_prompts) == (0, 1, 4)
    assert (count.degenerate, count.original_degenerate) == (2, 0)
    count_heldout(fluent, 3, None)  # type: ignore[arg-type]
    entries = [heldout_entry(session, 3) for session in (looping, fluent)]  # type: ignore[arg-type]
    assert entries[0] is not None and entries[1] is not None
    assert (entries[0]["degenerate"], entries[0]["original_degenerate"]) == (2, 0)
    assert (entries[1]["degenerate"], entries[1]["original_degenerate"]) == (0, 0)
    card = " ".join(_heldout(entries[0]))
    assert "Of its answers there, 2 (50%) were degenerate (a sentence or phrase repeated, a loop), against 0 (0%)" in card
    assert "Of its answers there, 0 (0%) were degenerate" in " ".join(_heldout(entries[1]))
    result = SimpleNamespace(number=3, refusals=1, refusals_text="1", search_refusals=None, verified=False)
    with console.capture() as captured:
        show_heldout(looping, result, None)  # type: ignore[arg-type]  # kept: nothing is generated again
    assert "degenerate answers 2/4 (50%; original 0/4)" in captured.get().replace("\n", " ")


def test_a_record_without_degenerate_counts_shows_the_refusals_only() -> None:
    """Counts kept in a study before the degenerate answers were counted: the refusals alone, as before."""
    session = heldout_session(ORIGINAL, ORIGINAL)
    session.heldout, session.heldout_degenerate = {None: 1, 3: 0}, {}
    count = count_heldout(session, 3, None)  # type: ignore[arg-type]
    assert count is not None and count.degenerate is None and session.heldout_evaluator.pending  # nothing generated
    entry = heldout_entry(session, 3)  # type: ignore[arg-type]
    assert entry is not None and "degenerate" not in entry
    assert "degenerate" not in " ".join(_heldout(entry))
    with console.capture() as captured:
        unverified = SimpleNamespace(number=3, refusals=0, refusals_text="0", search_refusals=None, verified=False)
        show_heldout(session, unverified, None)  # type: ignore[arg-type]
    assert "refusals" in captured.get() and "degenerate" not in captured.get()


def test_the_degenerate_counts_are_kept_in_the_study() -> None:
    import optuna

    study = optuna.create_study()
    session = heldout_session(ORIGINAL, [DEMO_LOOP * 4] * 4)
    session.study = study
    count_heldout(session, 5, None)  # type: ignore[arg-type]
    ((key, kept),) = study.user_attrs[HELDOUT_DEGENERATE_ATTR].items()
    assert kept == {"original": 0, "5": 4}
    again = heldout_session(ORIGINAL, ORIGINAL)  # a continued run: the kept counts, nothing generated
    again.study = study
    count = count_heldout(again, 5, None)  # type: ignore[arg-type]
    assert (
        count is not None
        and (count.degenerate, count.original_degenerate) == (4, 0)
        and len(again.heldout_evaluator.pending) == 2
    )
