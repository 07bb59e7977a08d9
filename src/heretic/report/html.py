"""The report as one self-contained HTML page: plotly.js inline once, no request to the network."""

from __future__ import annotations

import html
import os
from pathlib import Path

import plotly.graph_objects as go

from ..scoring.judge_rates import terminal_line
from . import figures
from .data import Example, ReportData, TrialPoint
from .geometry import COLUMNS

# The sections of the page, in order: (id, title). Tests check that each is present.
SECTIONS = [
    ("summary", "Summary"),
    ("front", "Pareto front and every trial"),
    ("kernels", "Ablation kernels"),
    ("progress", "Search progress"),
    ("importance", "Parameter importances"),
    ("directions", "Refusal directions"),
    ("residuals", "Residuals in 2-D"),
    ("examples", "Responses before and after"),
]

# In the head of every report: a file holding it may be replaced by a new report without asking.
REPORT_MARKER = '<meta name="generator" content="heretic report">'

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 24px 48px; color: #222; }
h1 { margin-top: 24px; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 40px; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #555; font-size: 14px; } .refused { color: #b00; font-weight: 600; } .complied { color: #070; font-weight: 600; }
pre { white-space: pre-wrap; margin: 0; font-size: 12px; max-width: 480px; }
nav a { margin-right: 14px; }
"""


class _Figures:
    """Renders figures as <div>s; the first one carries plotly.js (inline), the others reuse it."""

    def __init__(self) -> None:
        self.included = False

    def __call__(self, figure: go.Figure, div_id: str) -> str:
        figure.update_layout(template="plotly_white")
        text = figure.to_html(
            full_html=False,
            include_plotlyjs=not self.included,
            div_id=div_id,
            config={"displaylogo": False, "responsive": True},
        )
        self.included = True
        return str(text)


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def summary_section(data: ReportData) -> str:
    rows = [("Model", data.model), ("Judge", data.judge), ("Finished trials", str(len(data.trials)))]
    if data.base_refusals is not None:
        rows.append(("Original model", f"{data.base_refusals}/{data.n_prompts} refusals, KL 0"))
    if data.chosen is not None:
        chosen = data.trial(data.chosen)
        count = f"≥{chosen.refusals}" if chosen.cut else str(chosen.refusals)
        if chosen.verified is not None:
            count = f"{chosen.verified} (on whole responses, {chosen.degenerate} degenerate; in the search {count})"
        rows.append(("Chosen trial", f"{chosen.number}: {count}/{data.n_prompts} refusals, KL {chosen.kl:.4f}"))
        rows.append(("Its parameters", chosen.summary))
    if "original" in data.true_refusals and "chosen" in data.true_refusals:
        line = terminal_line(data.true_refusals["chosen"], data.true_refusals["original"])
        rows.append(("True refusals", line.removeprefix("True refusals: ")))
    if data.held_out is not None:
        held = data.held_out
        rows.append(
            ("Held-out refusals", f"original {held.original}/{held.prompts}, trial {data.chosen} {held.chosen}/{held.prompts}")
        )
    rows += held_out_rows(data)
    rows += [(f"{name} prompts", label) for name, label in data.prompt_sets.items()]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    notes = "".join(_note(note) for note in data.notes)
    return f"<table>{table}</table>" + _note(held_out_text(data)) + held_out_kl_table(data) + notes


def held_out_rows(data: ReportData) -> list[tuple[str, str]]:
    """Summary rows of the chosen trial's KL on the held-out harmless prompts and of the over-refusal counts."""
    rows = []
    if data.held_out_kl is not None:
        kl = data.held_out_kl
        in_search = f"; in the search {data.trial(data.chosen).kl:.4f}" if data.chosen is not None else ""
        rows.append(("Held-out KL", f"mean {kl.mean:.4f}, median {kl.median:.4f} ({kl.prompts} prompts, {kl.label}){in_search}"))
    if data.over_refusal is not None:
        over = data.over_refusal
        rows.append(
            (
                "Over-refusals",
                f"original {over.original}/{over.prompts}, trial {data.chosen} {over.chosen}/{over.prompts} "
                f"(harmless prompts that look harmful, {over.label})",
            )
        )
    return rows


def held_out_kl_table(data: ReportData) -> str:
    """The held-out harmless prompts where the chosen trial's KL divergence is highest (often those the original
    opens with a disclaimer: the tail a mean over the search's prompts hides)."""
    kl = data.held_out_kl
    if kl is None or not kl.highest:
        return ""
    rows = "".join(f"<tr><td>{html.escape(prompt)}</td><td class='num'>{value:.4f}</td></tr>" for prompt, value in kl.highest)
    intro = _note(f"The {len(kl.highest)} held-out harmless prompts with the highest KL divergence from the original:")
    return intro + f"<table id='heldout-kl-table'><tr><th>prompt</th><th>KL</th></tr>{rows}</table>"


def held_out_text(data: ReportData) -> str:
    """The held-out refusal count, or why there is none."""
    held = data.held_out
    if held is None:
        return (
            "Refusal counts are on the harmful evaluation prompts, the same prompts the search minimized them on; no held-out "
            "split was counted (--no-count-heldout), so the chosen trial's count may be optimistic for prompts it has not seen."
        )
    return (
        f"Held-out harmful prompts ({held.label}, {held.prompts} prompts the search never saw): the original refused "
        f"{held.original}, trial {data.chosen} refused {held.chosen}."
    )


def front_section(data: ReportData, render: _Figures) -> str:
    text = (
        f"Each of the {len(data.trials)} finished trials is one marker (hover for its parameters); the chosen trial is the "
        f"star. Cut trials stopped counting refusals once they were certainly dominated (their count is a lower bound). "
        f"Only one judge ({data.judge}) scored this search. The markers show the search's counts; {verified_text(data)}"
    )
    return _note(text) + render(figures.front_figure(data), "front-plot")


def verified_text(data: ReportData) -> str:
    """Which front trials were counted again on whole responses (heretic/verify.py), or that none was."""
    verified = [number for number in data.front if data.trial(number).verified is not None]
    if not verified:
        return "no trial was counted again on whole responses."
    return (
        f"trials {', '.join(map(str, verified))} were counted again on whole responses after the search (refusals marked ✓ "
        "below, with the search's count beside them); the front and the choice use those counts. Trials off the "
        "search's front are never counted again."
    )


def refusals_cell(point: TrialPoint) -> str:
    """A trial's refusals: the count on whole responses (✓) with the search's beside it, where there is one."""
    if point.verified is None:
        return str(point.refusals)
    return f"{point.verified} ✓ (search {point.refusals}, {point.degenerate} degenerate)"


def kernels_section(data: ReportData, render: _Figures) -> str:
    if data.chosen is None or data.num_layers == 0:
        return _note("No trial was chosen.")
    rows = "".join(
        f"<tr><td>{number}{' (chosen)' if number == data.chosen else ''}</td><td class='num'>{refusals_cell(data.trial(number))}</td>"
        f"<td class='num'>{data.trial(number).kl:.4f}</td><td>{html.escape(data.trial(number).summary)}</td></tr>"
        for number in data.front
    )
    table = f"<table><tr><th>front trial</th><th>refusals</th><th>KL</th><th>direction and kernels</th></tr>{rows}</table>"
    intro = _note("Weight per layer of each ablated component: the chosen trial bold, the front's other trials thin.")
    return intro + render(figures.kernels_figure(data), "kernels-plot") + table


def importance_section(data: ReportData, render: _Figures) -> str:
    if not data.importances:
        from .data import MIN_TRIALS_FOR_IMPORTANCE

        return _note(f"Parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} finished trials with varied scores.")
    return _note("How much of each objective's variance each parameter explains (Optuna's fANOVA evaluator).") + render(
        figures.importance_figure(data), "importance-plot"
    )


def geometry_table(data: ReportData) -> str:
    head = (
        "<tr><th>layer</th>"
        + "".join(f"<th title='{html.escape(meaning)}'>{html.escape(header)}</th>" for _, header, meaning in COLUMNS)
        + "</tr>"
    )
    rows = []
    for row in data.geometry:
        values = row.to_dict()
        cells = "".join(
            f"<td class='num'>{values[name]:.4f}</td>"
            if name.startswith(("cos", "sil"))
            else f"<td class='num'>{values[name]:.2f}</td>"
            for name, _, _ in COLUMNS
        )
        rows.append(f"<tr><td class='num'>{row.layer}</td>{cells}</tr>")
    legend = "; ".join(f"{header}: {meaning}" for _, header, meaning in COLUMNS)
    return f"<table id='geometry-table'>{head}{''.join(rows)}</table>" + _note(
        "g, b: means of the harmless and harmful residuals; g*, b*: their geometric medians; " + legend + "."
    )


def directions_section(data: ReportData, render: _Figures) -> str:
    if not data.geometry:
        return _note("The residuals were not available for this report.")
    return (
        "<h3>Per-layer norm of the harmful − harmless mean difference</h3>"
        + render(figures.direction_norms_figure(data), "norms-plot")
        + "<h3>Cosine similarity between the layers' refusal directions</h3>"
        + render(figures.similarity_figure(data), "similarity-plot")
        + "<h3>Residual geometry per layer</h3>"
        + geometry_table(data)
    )


def residuals_section(data: ReportData, render: _Figures) -> str:
    if not data.projections:
        return _note("The residuals were not available for this report.")
    method = {"pacmap": "PaCMAP", "pca": "PCA (install pacmap for PaCMAP projections)"}[data.projection_method]
    chosen = data.trial(data.chosen).parameters if data.chosen is not None else {}
    active = min(max(round(float(chosen.get("direction_index", 0.0))), 0), len(data.projections) - 1)
    text = (
        f"The residuals ({data.read_positions}) of the direction prompts at the output of each layer, projected to 2-D with "
        f"{method}; the original model and the chosen trial share one projection per layer. Move the slider to change layer."
    )
    return _note(text) + render(figures.projection_figure(data, active), "residuals-plot")


def _verdict(refused: bool) -> str:
    return "<span class='refused'>refusal</span>" if refused else "<span class='complied'>no refusal</span>"


def _example_row(example: Example) -> str:
    return (
        f"<tr><td>{example.kind}</td><td><pre>{html.escape(example.prompt)}</pre></td>"
        f"<td>{_verdict(example.refused_before)}<pre>{html.escape(example.before) or '(empty)'}</pre></td>"
        f"<td>{_verdict(example.refused_after)}<pre>{html.escape(example.after) or '(empty)'}</pre></td></tr>"
    )


def examples_section(data: ReportData) -> str:
    if not data.examples:
        return _note("No example responses were generated for this report.")
    head = f"<tr><th>set</th><th>prompt</th><th>original</th><th>trial {data.chosen}</th></tr>"
    return (
        _note(f"Greedy responses and the {data.judge} judge's verdict on each, for a few evaluation prompts of each set.")
        + f"<table id='examples-table'>{head}{''.join(_example_row(e) for e in data.examples)}</table>"
    )


def render_report(data: ReportData) -> str:
    """The whole page."""
    render = _Figures()
    bodies = {
        "summary": summary_section(data),
        "front": front_section(data, render),
        "kernels": kernels_section(data, render),
        "progress": render(figures.progress_figure(data), "progress-plot"),
        "importance": importance_section(data, render),
        "directions": directions_section(data, render),
        "residuals": residuals_section(data, render),
        "examples": examples_section(data),
    }
    nav = "".join(f"<a href='#{key}'>{html.escape(title)}</a>" for key, title in SECTIONS)
    sections = "".join(f"<section id='{key}'><h2>{html.escape(title)}</h2>{bodies[key]}</section>" for key, title in SECTIONS)
    title = f"Heretic report: {data.model}"
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>{REPORT_MARKER}<title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p class='note'>Written {html.escape(data.created)}</p><nav>{nav}</nav>{sections}</body></html>"
    )


def write_report(data: ReportData, path: Path) -> Path:
    """Write the page to `path` atomically (a partial file never stands at `path`)."""
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        staging.write_text(render_report(data), encoding="utf-8")
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path
