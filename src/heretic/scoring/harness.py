"""lm-evaluation-harness on a model in memory: the tasks (names, or paths of task YAML files), the model
wrapped for the harness, and the metrics it reports. Used by the benchmark action (export/benchmark.py)
and by the benchmark objective (scoring/builtin_objectives.py), which scores every trial this way."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from ..errors import HereticError, first_line

FEWSHOT_SEED = 1234  # lm_eval.simple_evaluate's default fewshot_random_seed


def task_names(tasks: list[str]) -> tuple[list[str], list[str]]:
    """(task names, folders to include): a YAML path stands for the task it defines."""
    names, folders = [], []
    for task in tasks:
        path = Path(task).expanduser()
        if path.suffix in {".yaml", ".yml"}:
            if not path.is_file():
                raise HereticError(f"The benchmark task file {path} does not exist.")
            folders.append(str(path.resolve().parent))
            names.append(task_name(path))
        else:
            names.append(task)
    return names, sorted(set(folders))


def task_name(path: Path) -> str:
    """The `task:` name a task YAML file defines."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("task:"):
            return line.split(":", 1)[1].strip().strip("'\"")
    raise HereticError(f"The benchmark task file {path} has no `task:` name.")


def task_manager(tasks: list[str]) -> tuple[list[str], Any]:
    """(task names, lm-evaluation-harness TaskManager that knows them); an unknown task is one sentence.
    Building the manager indexes every task the harness ships (seconds): build it once, run it often."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise HereticError("Benchmarks need lm-evaluation-harness; install it with `pip install 'heretic[eval]'`.") from None
    names, folders = task_names(tasks)
    manager = TaskManager(include_path=folders or None)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise HereticError(f"lm-evaluation-harness has no task {unknown[0]!r}; give a task name or the path of a task YAML file.")
    return names, manager


def wrap_model(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """The harness's HFLM around a transformers model in memory (its adapters, if any, apply: no copy, no save)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_tasks(language_model: Any, names: list[str], manager: Any, limit: int | None) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of one run of the tasks, loading them (and their datasets) for it."""
    import lm_eval

    try:
        output = lm_eval.simple_evaluate(model=language_model, tasks=names, task_manager=manager, limit=limit, log_samples=False)
    except (ConnectionError, OSError) as error:
        raise HereticError(
            f"A benchmark dataset could not be loaded ({first_line(error, 160)}); offline, use tasks with local data files."
        ) from None
    return metrics(output)


def load_tasks(names: list[str], manager: Any) -> Any:
    """The harness's tasks with their datasets read, to be run many times (`run_loaded`): zero-shot unless a
    task's YAML says otherwise, with the harness's default few-shot seed, as lm_eval.simple_evaluate sets them."""
    try:
        loaded = manager.load(names)
    except (ConnectionError, OSError) as error:
        raise HereticError(
            f"A benchmark dataset could not be loaded ({first_line(error, 160)}); offline, use tasks with local data files."
        ) from None
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return loaded


def run_loaded(language_model: Any, loaded: Any, limit: int | None) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of one run of tasks loaded by `load_tasks`, `limit` examples each (None: all).
    No standard errors (no bootstrap), no global reseeding and no progress bars: what a search needs per trial."""
    from lm_eval.evaluator import evaluate as harness_evaluate

    with contextlib.redirect_stderr(io.StringIO()):  # the harness's tqdm bars, drawn on stderr
        output = harness_evaluate(lm=language_model, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=False)
    return metrics(output)


def metrics(output: Any) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of the harness's output: its "metric,filter" entries without standard errors."""
    results: dict[str, dict[str, float]] = {}
    for task, values in (output or {}).get("results", {}).items():
        results[task] = {
            key.split(",")[0]: float(value)
            for key, value in values.items()
            if "," in key and isinstance(value, (int, float)) and "stderr" not in key
        }
    return results


def evaluate(model: Any, tokenizer: Any, tasks: list[str], limit: int | None, batch_size: int) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness metrics per task for an in-memory model: {task: {metric: value}}."""
    names, manager = task_manager(tasks)
    return run_tasks(wrap_model(model, tokenizer, batch_size), names, manager, limit)


def primary_score(results: dict[str, dict[str, float]], names: list[str]) -> float:
    """Mean over the tasks `names` of each one's first metric (the first of its metric_list, e.g. acc):

        score = (1 / T) * sum over tasks t of results[t][first metric of t]

    A group of tasks counts by its own aggregate when the harness reports one."""
    values = []
    for name in names:
        metrics = results.get(name)
        if not metrics:
            raise HereticError(f"lm-evaluation-harness reported no metric for the task {name!r}.")
        values.append(next(iter(metrics.values())))
    return sum(values) / len(values)
