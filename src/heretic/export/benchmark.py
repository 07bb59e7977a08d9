"""Benchmarks of the chosen model (and the original) with lm-evaluation-harness, side by side."""

from __future__ import annotations

from rich.table import Table

from ..ablation.parameters import AblationParameters
from ..scoring.harness import evaluate
from ..session import Session
from ..ui import console


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
