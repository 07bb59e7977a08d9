"""Console output: one rich console, logging, progress bars, responses."""

from __future__ import annotations

import logging
import sys
import warnings

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .prompts import Prompt
from .scoring.evaluator import ProgressHandle

console = Console(highlight=False)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, show_time=False)],
        force=True,
    )
    if level != "DEBUG":
        # Library chatter (deprecations, experimental APIs, tqdm bars) is not for our users.
        warnings.filterwarnings("ignore")
        import transformers
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        transformers.logging.set_verbosity_error()
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # bitsandbytes, when installed, is imported by peft and warns about optional CPU kernels even
        # in runs that quantize nothing.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        logging.getLogger("pacmap").setLevel(logging.ERROR)  # "random state is set" for every projection
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except ImportError:  # pragma: no cover
            pass


def is_interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


class _RichHandle(ProgressHandle):
    def __init__(self, progress: Progress, task: TaskID) -> None:
        self.progress, self.task = progress, task

    def advance(self, amount: int) -> None:
        self.progress.advance(self.task, amount)

    def close(self) -> None:
        self.progress.remove_task(self.task)


class ProgressBars:
    """A Progress display whose tasks come and go (a factory for the evaluator's progress handles)."""

    def __init__(self, transient: bool = True) -> None:
        self.progress = Progress(
            TextColumn("  {task.description:<14}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=transient,
        )

    def __enter__(self) -> ProgressBars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, description: str, total: int) -> ProgressHandle:
        return _RichHandle(self.progress, self.progress.add_task(description, total=total))


def print_responses(prompts: list[Prompt], responses: list[str], verdicts: list[bool]) -> None:
    """Every prompt with its response and the judge's verdict (--print-responses)."""
    refusals = sum(verdicts)
    console.rule(f"Responses: {refusals} of {len(prompts)} judged refusals")
    for prompt, response, refused in zip(prompts, responses, verdicts):
        verdict = "[red]refusal[/]" if refused else "[green]compliance[/]"
        console.print(f"[bold]Prompt:[/] {escape(prompt.user)}")
        console.print(f"[bold]Response[/] ({verdict}): {escape(response.strip()) or '(empty)'}")
        console.print()


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
