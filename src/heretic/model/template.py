"""Chat-template formatting of prompts."""

from __future__ import annotations

import logging
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..errors import HereticError

log = logging.getLogger(__name__)


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_chat(
    tokenizer: PreTrainedTokenizerBase,
    system: str,
    user: str,
    response_prefix: str = "",
    history: list[dict[str, str]] | None = None,
) -> str:
    """The model's chat template applied to (system, [history], user), ready for the first response token.

    Templates that reject a system role get the system prompt prepended to the first user turn.
    `response_prefix` is appended after the generation prompt (e.g. a closed thinking block).
    """
    if not has_chat_template(tokenizer):
        raise HereticError(
            f"The tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')} has no chat template; "
            "Heretic needs an instruction-tuned chat model (use the model's -Instruct/-it version)."
        )
    turns = list(history or []) + [{"role": "user", "content": user}]
    messages: list[dict[str, Any]] = ([{"role": "system", "content": system}] if system else []) + turns
    try:
        text = _apply(tokenizer, messages)
    except Exception as error:  # noqa: BLE001 - jinja TemplateError or template-raised exceptions
        if not system:
            raise HereticError(f"The chat template of this model failed on a plain user message ({error}).") from None
        log.debug("Chat template rejected the system role (%s); merging it into the first user turn", error)
        merged = [dict(turn) for turn in turns]
        merged[0]["content"] = f"{system}\n\n{merged[0]['content']}"
        try:
            text = _apply(tokenizer, merged)
        except Exception as second:  # noqa: BLE001
            raise HereticError(f"The chat template of this model failed on a plain user message ({second}).") from None
    return text + response_prefix


def _apply(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - multimodal templates want content as a list of parts
        parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
        return tokenizer.apply_chat_template(parts, tokenize=False, add_generation_prompt=True)
