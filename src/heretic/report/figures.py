"""The report's plotly figures, one function per view, from ReportData alone."""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ..ablation.parameters import AblationParameters
from .data import ReportData, TrialPoint

HARMFUL, HARMLESS = "#d62728", "#1f77b4"
KL_FLOOR = 1e-6  # KL is drawn on a log axis; a zero KL is drawn at this floor


def _kl(value: float) -> float:
    return max(value, KL_FLOOR)


def _hover(point: TrialPoint, n_prompts: int) -> str:
    refusals = f"≥{point.refusals}" if point.cut else str(point.refusals)
    return f"trial {point.number}<br>refusals {refusals}/{n_prompts}, KL {point.kl:.4g}<br>{point.summary.replace(', ', '<br>')}"


def _scatter(points: list[TrialPoint], data: ReportData, name: str, marker: dict[str, object]) -> go.Scatter:
    return go.Scatter(
        x=[_kl(point.kl) for point in points],
        y=[point.refusals for point in points],
        mode="markers",
        name=name,
        marker=marker,
        text=[_hover(point, data.n_prompts) for point in points],
        hovertemplate="%{text}<extra></extra>",
    )


def front_figure(data: ReportData) -> go.Figure:
    """Every trial (refusals against KL, log scale): the front joined by a line, cut trials hollow,
    the chosen one a star. Each trial is exactly one marker."""
    front = [data.trial(number) for number in data.front]
    groups = {
        "front": [p for p in front if p.number != data.chosen],
        "other trials": [p for p in data.trials if p.number not in data.front and not p.cut and p.number != data.chosen],
        "cut (refusals ≥)": [p for p in data.trials if p.cut and p.number != data.chosen],
        "chosen": [p for p in data.trials if p.number == data.chosen],
    }
    markers: dict[str, dict[str, object]] = {
        "front": dict(color="#ff7f0e", size=10),
        "other trials": dict(color="#7f7f7f", size=7, opacity=0.7),
        "cut (refusals ≥)": dict(color="#7f7f7f", size=7, symbol="circle-open"),
        "chosen": dict(color="#2ca02c", size=18, symbol="star", line=dict(color="black", width=1)),
    }
    figure = go.Figure()
    ordered = sorted(front, key=lambda p: p.kl)
    figure.add_trace(
        go.Scatter(
            x=[_kl(p.kl) for p in ordered],
            y=[p.refusals for p in ordered],
            mode="lines",
            line=dict(color="#ff7f0e", shape="hv", width=1),
            name="Pareto front",
            hoverinfo="skip",
        )
    )
    for name, points in groups.items():
        figure.add_trace(_scatter(points, data, name, markers[name]))
    if data.base_refusals is not None:
        figure.add_hline(y=data.base_refusals, line_dash="dot", annotation_text=f"original: {data.base_refusals}")
    figure.update_xaxes(type="log", title="KL divergence from the original (log scale)", exponentformat="power")
    figure.update_yaxes(title=f"refusals (of {data.n_prompts}, judge: {data.judge})", rangemode="tozero", **integer_ticks(data))
    figure.update_layout(height=480, margin=dict(t=30), legend=dict(orientation="h", y=-0.2))
    return figure


def integer_ticks(data: ReportData) -> dict[str, object]:
    """Axis settings that label whole refusal counts only (about ten ticks)."""
    highest = max([point.refusals for point in data.trials] + [data.base_refusals or 0, 1])
    return dict(tick0=0, dtick=max(1, math.ceil(highest / 10)))


def layer_ticks(num_layers: int) -> dict[str, object]:
    """Whole layer numbers on an axis, every one up to 20 layers, else every 2nd, 4th, ..."""
    return dict(tick0=0, dtick=max(1, 2 ** math.ceil(math.log2(max(num_layers, 1) / 20))) if num_layers > 20 else 1)


def kernel_weights(parameters: dict[str, object], component: str, num_layers: int) -> list[float]:
    ablation = AblationParameters.from_dict(parameters)
    return [ablation.weight(component, layer) for layer in range(num_layers)]


def kernels_figure(data: ReportData) -> go.Figure:
    """Ablation weight per layer for each component: the chosen trial bold, the front's other trials thin."""
    components = data.components or ["(none)"]
    figure = make_subplots(rows=1, cols=len(components), subplot_titles=components, shared_yaxes=True)
    layers = list(range(data.num_layers))
    shown = [number for number in data.front if number != data.chosen] + ([data.chosen] if data.chosen is not None else [])
    palette = [color for color in qualitative.Plotly if color != "#00CC96"]  # green is the chosen trial's
    colors = {number: palette[index % len(palette)] for index, number in enumerate(shown)}
    for column, component in enumerate(components, start=1):
        for number in shown:
            point = data.trial(number)
            chosen = number == data.chosen
            figure.add_trace(
                go.Scatter(
                    x=layers,
                    y=kernel_weights(point.parameters, component, data.num_layers),
                    mode="lines+markers" if chosen else "lines",
                    name=f"trial {number}" + (" (chosen)" if chosen else ""),
                    legendgroup=str(number),
                    showlegend=column == 1,
                    line=dict(width=4 if chosen else 1.5, color="#2ca02c" if chosen else colors[number]),
                    opacity=1.0 if chosen else 0.55,
                    hovertemplate=f"trial {number}<br>layer %{{x}}: weight %{{y:.3f}}<extra></extra>",
                ),
                row=1,
                col=column,
            )
        figure.update_xaxes(title="layer", row=1, col=column, **layer_ticks(data.num_layers))
    figure.update_yaxes(title="ablation weight", row=1, col=1)
    figure.update_layout(height=420, margin=dict(t=40))
    return figure


def best_so_far(values: list[float]) -> list[float]:
    best, out = math.inf, []
    for value in values:
        best = min(best, value)
        out.append(best)
    return out


def progress_figure(data: ReportData) -> go.Figure:
    """Refusals and KL of each trial against the time it finished, cut trials hollow, with the best so far:
    fewest refusals among trials with KL <= max_kl, and lowest KL."""
    points = sorted(data.trials, key=lambda p: p.finished)
    minutes = [p.finished / 60 for p in points]
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, subplot_titles=("refusals", "KL divergence"))
    symbols = ["circle-open" if p.cut else "circle" for p in points]
    texts = [_hover(p, data.n_prompts) for p in points]
    for row, values in ((1, [float(p.refusals) for p in points]), (2, [_kl(p.kl) for p in points])):
        figure.add_trace(
            go.Scatter(
                x=minutes,
                y=values,
                mode="markers",
                marker=dict(symbol=symbols, color="#7f7f7f", size=7),
                name="trials (hollow: cut)" if row == 1 else "trials",
                text=texts,
                hovertemplate="%{text}<extra></extra>",
                showlegend=row == 1,
            ),
            row=row,
            col=1,
        )
    eligible = [float(p.refusals) if (p.kl <= data.max_kl and not p.cut) else math.inf for p in points]
    fewest = [value if math.isfinite(value) else None for value in best_so_far(eligible)]
    figure.add_trace(
        go.Scatter(
            x=minutes,
            y=fewest,
            mode="lines",
            line=dict(shape="hv", color="#2ca02c"),
            name=f"fewest refusals so far (KL ≤ {data.max_kl})",
        ),
        row=1,
        col=1,
    )
    lowest = best_so_far([_kl(p.kl) for p in points])
    figure.add_trace(
        go.Scatter(x=minutes, y=lowest, mode="lines", line=dict(shape="hv", color="#9467bd"), name="lowest KL so far"),
        row=2,
        col=1,
    )
    figure.update_yaxes(type="log", exponentformat="power", row=2, col=1)
    figure.update_yaxes(rangemode="tozero", row=1, col=1, **integer_ticks(data))
    figure.update_xaxes(title="minutes since the first trial started", row=2, col=1)
    figure.update_layout(height=560, margin=dict(t=40))
    return figure


def importance_figure(data: ReportData) -> go.Figure:
    """fANOVA importance of each parameter, for each objective (horizontal bars)."""
    figure = go.Figure()
    names = sorted({name for values in data.importances.values() for name in values})
    for objective, values in data.importances.items():
        figure.add_trace(go.Bar(y=names, x=[values.get(name, 0.0) for name in names], orientation="h", name=objective))
    figure.update_layout(barmode="group", height=max(300, 26 * len(names) * max(1, len(data.importances))), margin=dict(t=30))
    figure.update_xaxes(title="importance (fANOVA, sums to 1 per objective)")
    return figure


def direction_norms_figure(data: ReportData) -> go.Figure:
    figure = go.Figure(go.Bar(x=list(range(len(data.difference_norms))), y=data.difference_norms, marker_color=HARMFUL))
    figure.update_xaxes(title="layer", **layer_ticks(len(data.difference_norms)))
    figure.update_yaxes(title="|mean harmful − mean harmless|")
    figure.update_layout(height=340, margin=dict(t=30))
    return figure


def similarity_figure(data: ReportData) -> go.Figure:
    layers = list(range(len(data.similarities)))
    figure = go.Figure(
        go.Heatmap(
            z=data.similarities,
            x=layers,
            y=layers,
            zmin=-1,
            zmax=1,
            colorscale="RdBu",
            reversescale=True,
            hovertemplate="layers %{x} and %{y}: cosine %{z:.3f}<extra></extra>",
        )
    )
    figure.update_xaxes(title="layer", **layer_ticks(len(layers)))
    figure.update_yaxes(title="layer", autorange="reversed", scaleanchor="x", **layer_ticks(len(layers)))
    figure.update_layout(height=520, width=600, margin=dict(t=30))
    return figure


def projection_figure(data: ReportData, active: int) -> go.Figure:
    """Per layer (a slider), harmful and harmless residuals in 2-D: the original (left) and the chosen trial (right)."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=("original", f"trial {data.chosen}"), shared_yaxes=True)
    for view in data.projections:
        for column, (harmful, harmless) in enumerate(
            ((view.original_harmful, view.original_harmless), (view.chosen_harmful, view.chosen_harmless)), start=1
        ):
            for name, points, color in (("harmful", harmful, HARMFUL), ("harmless", harmless, HARMLESS)):
                figure.add_trace(
                    go.Scatter(
                        x=[p[0] for p in points],
                        y=[p[1] for p in points],
                        mode="markers",
                        marker=dict(color=color, size=6, opacity=0.6),
                        name=name,
                        legendgroup=name,
                        showlegend=column == 1,
                        visible=view.layer == active,
                        hoverinfo="skip",
                    ),
                    row=1,
                    col=column,
                )
    per_layer = 4
    steps = []
    for index, view in enumerate(data.projections):
        visible = [index * per_layer <= k < (index + 1) * per_layer for k in range(per_layer * len(data.projections))]
        steps.append(dict(method="update", args=[{"visible": visible}], label=str(view.layer)))
    active_index = next((i for i, view in enumerate(data.projections) if view.layer == active), 0)
    figure.update_layout(
        sliders=[dict(active=active_index, steps=steps, currentvalue=dict(prefix="layer "), pad=dict(t=40))],
        height=520,
        margin=dict(t=40),
    )
    figure.update_xaxes(showticklabels=False)
    figure.update_yaxes(showticklabels=False)
    return figure
