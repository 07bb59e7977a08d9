"""The classifier judge: a --judge-model with a classification head, read from its refusal label."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny import PROMPT_FLAGS, make_tokenizer
from transformers import BertConfig, BertForSequenceClassification

from heretic.config import Settings
from heretic.errors import HereticError
from heretic.prompts import Prompt
from heretic.scoring.classifier_judge import (
    MINOS_TEMPLATE,
    ClassifierJudge,
    is_classifier_config,
    names_refusal,
    read_classifier,
    refusal_labels,
    refusal_log_odds,
)
from heretic.scoring.judges import judge_identity, make_judge

ASK = Prompt("You are a helpful assistant.", "How do I pick a lock?")
REFUSING = [
    "I'm sorry, but I can't help with that.",
    "Sorry, I can't help with that request.",
    "I'm sorry, I won't do that.",
    "Sorry, but no.",
]
COMPLYING = [
    "Sure, here is how.",
    "Here is how: first open the lock.",
    "Sure! Write the script in Python.",
    "The answer is a short list of steps.",
]
MINOS = {0: "Non-refusal", 1: "Refusal"}  # NousResearch/Minos-v1's labels
PROTECTAI = {0: "NORMAL", 1: "REJECTION"}  # protectai/distilroberta-base-rejection-v1's


def save_classifier(folder: Path, id2label: dict[int, str], refusal: int, minos: bool = False) -> Path:
    """A tiny BERT classifier trained (deterministically, on the CPU) to give `refusal` to REFUSING and the
    other label to COMPLYING (each after ASK in Minos's template with `minos`); saved with the tiny models' tokenizer."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=512,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
        id2label=id2label,
        label2id={label: index for index, label in id2label.items()},
    )
    model, tokenizer = BertForSequenceClassification(config), make_tokenizer()
    texts = [MINOS_TEMPLATE.format(prompt=ASK.user, response=r) if minos else r for r in REFUSING + COMPLYING]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = torch.tensor([refusal] * len(REFUSING) + [1 - refusal] * len(COMPLYING))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread is the fastest for a model this small
    try:
        for _ in range(40):
            optimizer.zero_grad()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    folder.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Minos-style labels (refusal = 1) in a folder named like Minos, and protectai's order reversed (refusal = 0)."""
    root = tmp_path_factory.mktemp("classifiers")
    return {
        "minos": save_classifier(root / "tiny-minos", MINOS, refusal=1, minos=True),
        "reversed": save_classifier(root / "tiny-rejection", {0: "REJECTION", 1: "NORMAL"}, refusal=0),
    }


# --- Labels ------------------------------------------------------------------------------------------


def test_refusal_labels_come_from_the_label_names() -> None:
    assert refusal_labels(MINOS) == [1] and refusal_labels(PROTECTAI) == [1]
    assert refusal_labels({0: "refused", 1: "complied"}) == [0]
    assert refusal_labels({0: "LABEL_0", 1: "LABEL_1"}) == [1]  # unnamed binary head: label 1, as Minos-style models
    assert refusal_labels({0: "safe", 1: "hard_refusal", 2: "soft-refusal"}) == [1, 2]
    assert (
        refusal_labels({0: "positive", 1: "negative"}) == [] and refusal_labels({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}) == []
    )
    assert [names_refusal(name) for name in ("Non-refusal", "not_refused", "NO REJECTION", "Rejected")] == [False] * 3 + [True]


def test_a_classifier_is_told_by_its_architecture_or_a_refusal_label() -> None:
    assert is_classifier_config(BertConfig(architectures=["BertForSequenceClassification"]))
    assert is_classifier_config(BertConfig(id2label=PROTECTAI))  # no architecture named, a refusal label
    assert not is_classifier_config(BertConfig(architectures=["BertForMaskedLM"]))  # default LABEL_0, LABEL_1


def test_unidentifiable_labels_are_refused_in_one_sentence(tmp_path: Path) -> None:
    BertConfig(architectures=["BertForSequenceClassification"], id2label={0: "positive", 1: "negative"}).save_pretrained(tmp_path)
    with pytest.raises(HereticError, match=r"labels \(positive, negative\) name no refusal class") as raised:
        read_classifier(str(tmp_path))
    assert str(raised.value).count(". ") == 0 and str(raised.value).endswith(".")


def test_causal_models_and_gguf_files_are_no_classifiers(tiny_models: dict[str, Path]) -> None:
    assert read_classifier(str(tiny_models["llama"])) is None


def test_log_odds_of_a_softmax_and_a_sigmoid_head() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])  # (pairs, labels)
    e = torch.e
    one = torch.tensor([2 - torch.log(torch.tensor(1 + e)), -torch.log(torch.tensor(e**3 + 1))])
    two = torch.log(torch.tensor([(e**2 + e) / 1, 2 / e**3]))
    torch.testing.assert_close(refusal_log_odds(logits, [1], sigmoid=False), one)
    torch.testing.assert_close(refusal_log_odds(logits, [1, 2], sigmoid=False), two)
    torch.testing.assert_close(refusal_log_odds(logits, [1, 2], sigmoid=True), torch.tensor([2.0, 0.0]))
    # p(refusal) = 1/2 is log-odds 0
    assert refusal_log_odds(torch.tensor([[1.5, 1.5]]), [0], sigmoid=False).item() == 0.0


# --- Verdicts ----------------------------------------------------------------------------------------


def classifier_judge(folder: Path, threshold: float = 0.0) -> ClassifierJudge:
    judge = make_judge(Settings(judge="model", judge_model=str(folder), judge_threshold=threshold, device_map="cpu"))
    assert isinstance(judge, ClassifierJudge)
    return judge


@pytest.mark.parametrize("kind", ["minos", "reversed"])
def test_verdicts_follow_the_refusal_label_and_the_threshold(kind: str, classifiers: dict[str, Path]) -> None:
    judge = classifier_judge(classifiers[kind])
    responses = REFUSING + COMPLYING + ["  "]
    assert judge.judge([ASK] * len(responses), responses) == [True] * 4 + [False] * 4 + [True]  # empty: a refusal
    scores = judge.scores([ASK] * 8, REFUSING + COMPLYING)
    assert min(scores[:4]) > 0 > max(scores[4:])
    # The threshold is the log-odds of refusal: above every score, nothing but the empty response refuses.
    assert classifier_judge(classifiers[kind], max(scores) + 1).judge([ASK] * 3, ["Sure, here is how.", REFUSING[0], ""]) == [
        False,
        False,
        True,
    ]
    # Read with the other label as the refusal, every verdict turns: the mapping is what decides.
    other = 1 - judge.reading.refusal[0]
    flipped = ClassifierJudge(judge.model, judge.tokenizer, replace(judge.reading, refusal=(other,)))
    assert flipped.judge([ASK] * 8, REFUSING + COMPLYING) == [False] * 4 + [True] * 4


def test_batches_give_the_scores_of_one_pass(classifiers: dict[str, Path]) -> None:
    judge = classifier_judge(classifiers["reversed"])
    responses = REFUSING + COMPLYING + ["A much longer response that goes on " * 8]
    whole = judge.scores([ASK] * len(responses), responses)
    judge.batch_size = 2
    torch.testing.assert_close(
        torch.tensor(judge.scores([ASK] * len(responses), responses)), torch.tensor(whole), atol=1e-5, rtol=0
    )
    judge.batch_size = 1
    torch.testing.assert_close(
        torch.tensor(judge.scores([ASK] * len(responses), responses)), torch.tensor(whole), atol=1e-5, rtol=0
    )


def test_minos_reads_prompt_and_response_others_the_response(classifiers: dict[str, Path]) -> None:
    minos, other = classifier_judge(classifiers["minos"]), classifier_judge(classifiers["reversed"])
    assert minos.texts([ASK], ["No."]) == ["<|user|>\nHow do I pick a lock?\n<|assistant|>\nNo."]
    assert other.texts([ASK], ["No."]) == ["No."]
    assert minos.max_length == 128 and next(minos.model.parameters()).dtype == torch.float32


def test_the_fingerprint_knows_the_classifier(classifiers: dict[str, Path]) -> None:
    settings = Settings(judge="model", judge_model=str(classifiers["minos"]), judge_threshold=0.5)
    assert judge_identity(settings) == {
        "judge": "model",
        "model": str(classifiers["minos"]),
        "threshold": 0.5,
        "classifier": {"refusal": ["Refusal"], "input": "minos", "revision": 1},
    }


# --- End to end --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_search_judged_by_a_classifier(classifiers: dict[str, Path], tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A short run on a tiny model judged by the classifier: at a threshold below every score, every response
    is a refusal."""
    command = [
        sys.executable,
        "-m",
        "heretic",
        str(tiny_models["llama"]),
        *PROMPT_FLAGS,
        *["--max-response-length", "8", "--batch-size", "8", "--n-trials", "2", "--n-startup-trials", "2"],
        *["--judge", "model", "--judge-model", str(classifiers["reversed"]), "--judge-threshold", "-1000"],
        *["--checkpoint-dir", str(tmp_path / "checkpoints"), "--headless", "--no-count-heldout"],
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Refusal judge: classifier" in result.stdout and "Original model: 8/8 refusals" in result.stdout
    assert "Chosen trial" in result.stdout
