"""Streaming multi-turn chat with the chosen model in the terminal."""

from __future__ import annotations

import threading
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .model.template import format_chat
from .ui import console

HELP = "Type a message. /reset starts a new conversation, /exit (or an empty line twice, or Ctrl+D) leaves."


class _Stop(StoppingCriteria):
    """Lets Ctrl+C end the current answer without leaving the chat."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> bool:
        return self.requested


def chat_loop(loaded: Any, system_prompt: str, response_prefix: str = "", max_new_tokens: int = 1024) -> None:
    model, tokenizer = loaded.model, loaded.tokenizer
    history: list[dict[str, str]] = []
    console.print(f"[dim]{HELP}[/]")
    empty = 0
    while True:
        try:
            message = console.input("[bold cyan]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        text = message.strip()
        if text in {"/exit", "/quit"}:
            return
        if text == "/reset":
            history.clear()
            console.print("[dim]New conversation.[/]")
            continue
        if not text:
            empty += 1
            if empty >= 2:
                return
            continue
        empty = 0
        prompt = format_chat(tokenizer, system_prompt, text, response_prefix, history=history)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(loaded.input_device)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = _Stop()
        worker = threading.Thread(
            target=_generate,
            kwargs=dict(
                model=model,
                inputs=inputs,
                streamer=streamer,
                stop=stop,
                max_new_tokens=max_new_tokens,
                pad=tokenizer.pad_token_id,
            ),
            daemon=True,
        )
        worker.start()
        answer = []
        console.print("[bold green]model>[/] ", end="")
        try:
            for piece in streamer:
                answer.append(piece)
                console.print(piece, end="", markup=False, highlight=False)
        except KeyboardInterrupt:
            stop.requested = True
            console.print(" [dim](stopped)[/]", end="")
            for piece in streamer:  # drain what is left
                answer.append(piece)
        worker.join()
        console.print()
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(answer).strip()}]


@torch.inference_mode()
def _generate(model: Any, inputs: Any, streamer: TextIteratorStreamer, stop: _Stop, max_new_tokens: int, pad: int | None) -> None:
    model.generate(
        **inputs,
        streamer=streamer,
        max_new_tokens=max_new_tokens,
        stopping_criteria=StoppingCriteriaList([stop]),
        pad_token_id=pad,
    )
