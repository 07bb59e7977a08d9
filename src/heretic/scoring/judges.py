"""Choosing the refusal judge from the settings (--judge: a built-in judge or a plug-in)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

from ..config import BUILTIN_JUDGES, Settings
from ..model.generation import Engine
from .classifier_judge import load_classifier_judge, read_classifier
from .http_judge import HttpJudge, HttpJudgeConfig
from .model_judge import ModelJudge
from .refusals import MarkerJudge, RefusalJudge, load_judge
from .rules import RULES_REVISION, RuleJudge

# Makes the Engine of a model the judge loads itself (--judge-model): name -> engine.
EngineLoader = Callable[[str], Engine]


def judge_identity(settings: Settings) -> object:
    """What the judge is, for the checkpoint fingerprint: a search resumes only under the same judge.

    The marker judge enters as its sorted markers, as it always has, so older checkpoints still resume.
    The rules judge enters with the revision of its rules (RULES_REVISION): rules that can give another
    verdict make another search. A classifier judge model enters with how it is read (its refusal labels,
    its input, CLASSIFIER_REVISION)."""
    if settings.judge not in BUILTIN_JUDGES:  # a plug-in: its name, as it always entered
        return settings.judge
    if settings.judge == "markers":
        return sorted(settings.refusal_markers)
    identity: dict[str, object] = {"judge": settings.judge}
    if settings.judge == "rules":
        identity.update(revision=RULES_REVISION)
    elif settings.judge == "model":
        identity.update(model=settings.judge_model, threshold=settings.judge_threshold)
        reading = read_classifier(settings.judge_model, settings.trust_remote_code) if settings.judge_model else None
        if reading is not None:
            identity.update(classifier=reading.identity())
    elif settings.judge == "http":
        identity.update(url=settings.judge_url, model=settings.judge_model)
    return identity


def make_judge(
    settings: Settings,
    engine: Engine | None = None,
    original: Callable[[], AbstractContextManager[object]] | None = None,
    load_engine: EngineLoader | None = None,
) -> RefusalJudge:
    """The judge the settings ask for.

    The model judge uses `engine` (the searched model) entered into `original()` (its adapters off), or,
    with --judge-model or without an engine, a model loaded by `load_engine`; a --judge-model with a
    classification head is a classifier judge instead (classifier_judge.py)."""
    if settings.judge not in BUILTIN_JUDGES:
        return load_judge(settings.judge, settings)
    if settings.judge == "rules":
        return RuleJudge()
    if settings.judge == "model":
        reading = read_classifier(settings.judge_model, settings.trust_remote_code) if settings.judge_model else None
        if settings.judge_model and reading is not None:
            return load_classifier_judge(
                settings.judge_model,
                reading,
                settings.judge_threshold,
                settings.device_map,
                settings.trust_remote_code,
                settings.batch_size,
            )
        name = settings.judge_model or (None if engine is not None else settings.model)
        if name is not None:
            assert load_engine is not None, "a judge model to load needs a loader"
            engine, original = load_engine(name), None
        assert engine is not None
        return ModelJudge(engine, original, settings.judge_threshold)
    if settings.judge == "http":
        assert settings.judge_url is not None  # checked by Settings
        judge = HttpJudge(
            HttpJudgeConfig(
                settings.judge_url,
                settings.judge_model,
                settings.judge_api_key_env,
                settings.judge_timeout,
                concurrency=settings.judge_concurrency,
            )
        )
        judge.check()
        return judge
    return MarkerJudge(settings.refusal_markers)
