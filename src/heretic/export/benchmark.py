"""Benchmarks of the chosen model (and the original) with lm-evaluation-harness, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from ..ablation.parameters import AblationParameters
from ..errors import HereticError, first_line
from ..session import Session
from ..ui import console


def _task_names(tasks: list[str]) -> tuple[list[str], list[str]]:
    """(task names, folders to include): a YAML path stands for the task it defines."""
    names, folders = [], []
    for task in tasks:
        path = Path(task).expanduser()
        if path.suffix in {".yaml", ".yml"}:
            if not path.is_file():
                raise HereticError(f"The benchmark task file {path} does not exist.")
            folders.append(str(path.resolve().parent))
            names.append(_task_name(path))
        else:
            names.append(task)
    return names, sorted(set(folders))


def _task_name(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("task:"):
            return line.split(":", 1)[1].strip().strip("'\"")
    raise HereticError(f"The benchmark task file {path} has no `task:` name.")


def evaluate(model: Any, tokenizer: Any, tasks: list[str], limit: int | None, batch_size: int) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness metrics per task for an in-memory model: {task: {metric: value}}."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise HereticError("Benchmarks need lm-evaluation-harness; install it with `pip install 'heretic[eval]'`.") from None
    names, folders = _task_names(tasks)
    manager = TaskManager(include_path=folders or None)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise HereticError(f"lm-evaluation-harness has no task {unknown[0]!r}; give a task name or the path of a task YAML file.")
    language_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        output = lm_eval.simple_evaluate(model=language_model, tasks=names, task_manager=manager, limit=limit, log_samples=False)
    except (ConnectionError, OSError) as error:
        raise HereticError(
            f"A benchmark dataset could not be loaded ({first_line(error, 160)}); offline, use tasks with local data files."
        ) from None
    results: dict[str, dict[str, float]] = {}
    for task, metrics in (output or {}).get("results", {}).items():
        results[task] = {
            key.split(",")[0]: float(value)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and "stderr" not in key and key != "alias"
        }
    return results


def run_benchmarks(session: Session, parameters: AblationParameters) -> dict[str, dict[str, dict[str, float]]]:
    settings = session.settings
    model, tokenizer = session.ablator.base_model, session.loaded.tokenizer
    batch = max(1, session.engine.batch_size)
    runs: dict[str, dict[str, dict[str, float]]] = {}
    try:
        session.ablator.apply(parameters, session.directions)
        with console.status("Benchmarking the ablated model..."):
            runs["ablated"] = evaluate(model, tokenizer, settings.benchmark_tasks, settings.benchmark_limit, batch)
        if settings.benchmark_original:
            session.ablator.reset()
            with console.status("Benchmarking the original model..."):
                runs["original"] = evaluate(model, tokenizer, settings.benchmark_tasks, settings.benchmark_limit, batch)
    finally:
        session.ablator.apply(parameters, session.directions)
    console.print(benchmark_table(runs))
    return runs


def benchmark_table(runs: dict[str, dict[str, dict[str, float]]]) -> Table:
    columns = [name for name in ("original", "ablated") if name in runs]
    table = Table(title="Benchmarks (lm-evaluation-harness)", title_justify="left")
    table.add_column("task")
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    for task, metrics in runs[columns[-1]].items():
        for metric in metrics:
            table.add_row(task, metric, *(f"{runs[name].get(task, {}).get(metric, float('nan')):.4f}" for name in columns))
    return table
