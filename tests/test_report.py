"""The HTML report and the research views: geometry with known answers, projections, the page, the
images, and end to end on a tiny study rendered in a real headless browser."""

from __future__ import annotations

import html
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from PIL import Image
from tiny import PROMPT_FLAGS, SCORING_FLAGS

from heretic.report import geometry
from heretic.report.data import MIN_TRIALS_FOR_IMPORTANCE, study_report_data
from heretic.report.html import SECTIONS, render_report
from heretic.report.projection import align, pca_2d, project_groups

# --- Geometry: known answers -------------------------------------------------------------------


def residuals_of(*layers: list[list[float]]) -> torch.Tensor:
    """(prompts, positions, hidden) from one list of points per residual position."""
    return torch.tensor(layers, dtype=torch.float32).transpose(0, 1)


def test_geometry_of_two_small_sets() -> None:
    # position 0 (embeddings) is left out; at position 1: harmless g = (1, 0), harmful b = (2, 2), r = (1, 2)
    harmless = residuals_of([[9, 9], [9, 9]], [[1, 1], [1, -1]])
    harmful = residuals_of([[9, 9], [9, 9]], [[1, 2], [3, 2]])
    (row,) = geometry.residual_geometry(harmful, harmless)
    assert row.layer == 0
    assert row.cos_means == pytest.approx(1 / math.sqrt(2))
    assert row.cos_harmless_direction == pytest.approx(1 / math.sqrt(5))
    assert row.cos_harmful_direction == pytest.approx(6 / math.sqrt(40))
    assert (row.norm_harmless, row.norm_harmful, row.norm_direction) == pytest.approx((1, math.sqrt(8), math.sqrt(5)))
    # two points: their median is their midpoint, i.e. the mean (Weiszfeld starts and stays there)
    assert (row.cos_medians, row.norm_direction_median) == pytest.approx((1 / math.sqrt(2), math.sqrt(5)))
    assert geometry.difference_norms(harmful, harmless) == pytest.approx([math.sqrt(5)])


def test_geometric_median_ignores_an_outlier() -> None:
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    assert geometry.geometric_median(points).tolist() == pytest.approx([1.0, 0.0], abs=1e-4)  # the mean is 3.67
    # a square's corners and its centre twice: the unit vectors towards the others sum to length 1 < 2 at the
    # centre, so the centre is the median however far the outlier is
    square = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0], [1.0, 1.0], [1.0, 1.0], [50.0, 50.0]])
    assert geometry.geometric_median(square).tolist() == pytest.approx([1.0, 1.0], abs=1e-4)


def test_silhouette_known_answer() -> None:
    # 1-D: {0, 1} and {4, 5}: s = 7/9 for 0 and 5, 5/7 for 1 and 4
    first, second = torch.tensor([[0.0], [1.0]]), torch.tensor([[4.0], [5.0]])
    assert geometry.silhouette(first, second) == pytest.approx((7 / 9 + 5 / 7) / 2)
    mixed = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [3.0]])
    assert geometry.silhouette(*mixed) < 0  # interleaved sets


def test_silhouette_agrees_with_scikit_learn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(20, 5, generator=generator)
    second = torch.randn(15, 5, generator=generator) + 1.5
    labels = [0] * 20 + [1] * 15
    expected = metrics.silhouette_score(torch.cat([first, second]).numpy(), labels)
    assert geometry.silhouette(first, second) == pytest.approx(expected, abs=1e-6)


def test_direction_similarities() -> None:
    directions = torch.tensor([[5.0, 5.0], [1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])  # position 0 left out
    similarities = geometry.direction_similarities(directions)
    expected = torch.tensor([[1, 0, -1], [0, 1, 0], [-1, 0, 1]], dtype=torch.float64)
    assert torch.allclose(similarities, expected)


def test_cosine_of_a_zero_vector_is_zero() -> None:
    assert geometry.cosine(torch.zeros(3), torch.ones(3)) == 0.0


# --- Projections -------------------------------------------------------------------------------


def test_pca_of_points_on_a_line_keeps_their_distances() -> None:
    steps = np.array([-2.0, -1.0, 0.0, 1.0, 3.0])
    axis = np.array([1.0, 2.0, 2.0]) / 3.0
    points = steps[:, None] * axis[None, :] + np.array([5.0, 5.0, 5.0])
    projected = pca_2d(points)
    assert projected.shape == (5, 2)
    assert np.allclose(projected[:, 1], 0.0, atol=1e-9)
    assert np.allclose(np.abs(np.diff(projected[:, 0])), np.abs(np.diff(steps)))


def test_alignment_puts_harmless_left_of_harmful() -> None:
    generator = np.random.default_rng(0)
    harmless = generator.normal(size=(30, 6))
    harmful = generator.normal(size=(30, 6)) + np.array([0, 0, 4.0, 4.0, 0, 0])
    projected_harmful, projected_harmless = project_groups([harmful, harmless], "pca")
    gap = projected_harmful.mean(axis=0) - projected_harmless.mean(axis=0)
    assert gap[0] > 0 and abs(gap[1]) < 1e-9
    assert np.abs(np.vstack([projected_harmful, projected_harmless])).max() == pytest.approx(1.0)


def test_align_rotates_a_known_picture() -> None:
    points = np.array([[0.0, 1.0], [0.0, -1.0]])  # harmful above harmless: rotated by -90 degrees
    aligned = align(points, np.array([True, False]), np.array([False, True]))
    assert np.allclose(aligned, [[1.0, 0.0], [-1.0, 0.0]])


# --- The page, from a study alone ---------------------------------------------------------------


def synthetic_study(n_trials: int) -> optuna.Study:
    """A study whose trials carry what the search records (refusals, KL, cut, parameters, seconds)."""
    study = optuna.create_study(directions=["minimize", "minimize"])
    generator = np.random.default_rng(1)
    for number in range(n_trials):
        trial = study.ask()
        index = trial.suggest_float("direction_index", 1.0, 3.0)
        weight = trial.suggest_float("attn.max_weight", 0.8, 1.5)
        parameters = {
            "direction_scope": "global",
            "direction_index": index,
            "kernels": {"attn": dict(max_weight=weight, max_weight_position=2.0, min_weight=0.1, min_weight_distance=1.5)},
        }
        refusals, kl = int(generator.integers(0, 9)), float(generator.uniform(0.001, 1.0))
        for key, value in dict(parameters=parameters, refusals=refusals, kl=kl, cut=number == 2, seconds=1.0).items():
            trial.set_user_attr(key, value)
        study.tell(trial, [refusals, kl])
    return study


def test_page_has_every_section_and_plotly_inline_once() -> None:
    study = synthetic_study(MIN_TRIALS_FOR_IMPORTANCE + 2)
    data = study_report_data(study, "tiny <model>", chosen=0, judge="markers", n_prompts=8, num_layers=4)
    page = render_report(data)
    for key, _ in SECTIONS:
        assert f"<section id='{key}'>" in page
    assert page.count("Plotly.newPlot") == 4  # front, kernels, progress, importances (the residual views need a model)
    assert len(re.findall(r"/\*\*\s*\n?\s*\* plotly\.js v", page)) == 1  # the library, inline, once
    assert not re.search(r"<script[^>]+src=", page)  # nothing fetched
    assert "tiny &lt;model&gt;" in page and "no held-out split" in page
    assert data.importances and set(data.importances["refusals"]) == {"direction_index", "attn.max_weight"}


def test_front_plot_has_one_marker_per_trial() -> None:
    from heretic.report.figures import front_figure

    study = synthetic_study(9)
    data = study_report_data(study, "m", chosen=data_chosen(study), judge="markers", n_prompts=8, num_layers=4)
    markers = sum(len(trace.x) for trace in front_figure(data).data if "markers" in (trace.mode or ""))
    assert markers == 9


def data_chosen(study: optuna.Study) -> int:
    return min(study.trials, key=lambda trial: trial.user_attrs["kl"]).number


def test_the_summary_gives_the_true_refusals_corrected_for_the_judge() -> None:
    from heretic.report.html import summary_section
    from heretic.scoring.judge_rates import corrected_entry, measured_rates

    data = study_report_data(synthetic_study(2), "m", chosen=0, judge="rules", n_prompts=64, num_layers=4)
    rates = measured_rates({"judge": "rules"})
    data.true_refusals = {"original": corrected_entry(16, 64, rates), "chosen": corrected_entry(6, 64, rates)}
    summary = summary_section(data)
    assert "<tr><th>True refusals</th><td>≈ 6 (95 %: 0–17, corrected for the rules judge&#x27;s error rates on 619" in summary
    assert "Qwen2.5-Coder-1.5B-Instruct); the original ≈ 24 (95 %: 13–37)</td></tr>" in summary


def test_too_few_trials_for_importances_are_said_so() -> None:
    data = study_report_data(synthetic_study(2), "m", chosen=0, judge="markers", n_prompts=8, num_layers=4)
    assert data.importances == {}
    assert f"need at least {MIN_TRIALS_FOR_IMPORTANCE} finished trials" in render_report(data)


# --- Images ------------------------------------------------------------------------------------


def test_plot_residuals_writes_a_png_per_layer_and_an_animation(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from heretic.report.plots import TRANSITION_FRAMES, plot_residuals

    generator = np.random.default_rng(0)
    layers = [np.clip(generator.normal(size=(10, 2)) / 3, -1, 1) for _ in range(3)]
    written = plot_residuals(layers, 5, tmp_path / "plots", "test")
    assert [path.name for path in written] == ["layer_000.png", "layer_001.png", "layer_002.png", "animation.gif"]
    with Image.open(written[-1]) as animation:
        assert animation.n_frames == 3 + 2 * (TRANSITION_FRAMES - 1)
    with Image.open(written[0]) as first:
        assert first.size == (700, 550)


# --- Example responses: generated once for the examples action and the report ----------------------


def test_examples_are_generated_once_per_trial_and_smaller_sets_are_their_first_rows() -> None:
    from types import SimpleNamespace

    from heretic.ablation.parameters import AblationParameters
    from heretic.prompts import Prompt
    from heretic.report.research import examples

    calls: list[int] = []

    def responses(prompts: list[Prompt]) -> list[str]:
        calls.append(len(prompts))
        return [f"reply to {prompt.user} ({len(calls)})" for prompt in prompts]

    harmful = [Prompt("", f"bad {i}") for i in range(5)]
    evaluator = SimpleNamespace(harmful=harmful, harmless=[Prompt("", f"good {i}") for i in range(5)], responses=responses)
    applied: list[object] = []
    ablator = SimpleNamespace(reset=lambda: applied.append(None), apply=lambda parameters, directions: applied.append(parameters))
    judge = SimpleNamespace(judge=lambda prompts, texts: [False] * len(texts))
    session = SimpleNamespace(
        evaluator=evaluator,
        ablator=ablator,
        judge=judge,
        base_verdicts=[False, False, True, False, True],
        directions=None,
        examples={},
    )
    parameters = AblationParameters.from_dict({"direction_scope": "global", "direction_index": 1.0, "kernels": {}})
    four = examples(session, parameters, 4)  # type: ignore[arg-type]
    assert calls == [8, 8]  # before and after, once
    assert [e.prompt for e in four if e.kind == "harmful"] == ["bad 2", "bad 4", "bad 0", "bad 1"]  # refused first
    three = examples(session, parameters, 3)  # type: ignore[arg-type]  # the examples action after the report's
    assert calls == [8, 8] and applied[-1] is parameters  # nothing generated again; the trial left applied
    assert three == [e for e in four if e.kind == "harmful"][:3] + [e for e in four if e.kind == "harmless"][:3]
    examples(session, parameters, 5)  # type: ignore[arg-type]  # more than were made: generated anew
    assert calls == [8, 8, 10, 10]
    other = AblationParameters.from_dict({"direction_scope": "global", "direction_index": 2.0, "kernels": {}})
    examples(session, other, 2)  # type: ignore[arg-type]
    assert calls == [8, 8, 10, 10, 4, 4]


# --- End to end on a tiny study ----------------------------------------------------------------


def heretic(model: Path, *extra: str, cwd: Path, code: int = 0) -> str:
    command = [
        sys.executable,
        "-m",
        "heretic",
        str(model),
        *PROMPT_FLAGS,
        *SCORING_FLAGS,
        "--n-startup-trials",
        "3",
        "--headless",
        "--report-examples",
        "2",
        *extra,
    ]
    # The module's study is made before the per-test isolation applies: no HERETIC_* from outside, a cache of its own.
    env = {key: value for key, value in os.environ.items() if not key.startswith("HERETIC_")}
    env.update(PYTHONUNBUFFERED="1", COLUMNS="250", HERETIC_CACHE_DIR=str(cwd / "cache"), HERETIC_DTYPES='["float32"]')
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == code, result.stdout + result.stderr
    return result.stdout + result.stderr


N_TRIALS = 6


@pytest.fixture(scope="module")
def tiny_study(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny search of N_TRIALS trials with the report action and both research views."""
    folder = tmp_path_factory.mktemp("tiny-study")
    output = heretic(
        tiny_models["llama"],
        "--n-trials",
        str(N_TRIALS),
        "--action",
        "examples,report",
        "--output-dir",
        "out/model",
        "--print-residual-geometry",
        "--plot-residuals",
        "plots",
        cwd=folder,
    )
    return {"folder": folder, "output": output, "report": folder / "out" / "model.report.html"}


@pytest.mark.slow
def test_search_prints_the_geometry_draws_the_residuals_and_writes_the_report(tiny_study: dict[str, object]) -> None:
    folder, output = Path(str(tiny_study["folder"])), str(tiny_study["output"])
    assert "Residual geometry" in output and "S(g*,b*)" in output and "silhouette" in output
    # Where the residuals are read (the default: the mean of the chat template's last five tokens), said in both.
    assert "Residual geometry (mean of the last 5 prompt tokens" in " ".join(output.split())
    expected = {f"layer_{i:03d}.png" for i in range(4)} | {"animation.gif"}
    assert {path.name for path in (folder / "plots").iterdir()} == expected
    report = Path(str(tiny_study["report"]))
    assert f"Report written to {report}" in " ".join(output.split())
    page = report.read_text()
    for key, _ in SECTIONS:
        assert f"<section id='{key}'>" in page
    assert "id='geometry-table'" in page and "id='examples-table'" in page
    # The chosen trial on prompts the search never saw: its KL on the held-out harmless prompts (the five highest
    # in a table) and the over-refusal counts, in the terminal and on the page.
    printed = " ".join(output.split())
    assert "Held-out harmless prompts (never seen by the search): KL divergence mean" in printed
    assert "Over-refusal prompts (harmless prompts that look harmful):" in printed
    assert "<tr><th>Held-out KL</th><td>mean " in page and "(8 prompts, bundled:harmless_heldout[:8]); in the search " in page
    assert "<tr><th>Over-refusals</th><td>original " in page and "id='heldout-kl-table'" in page
    assert page.split("id='heldout-kl-table'")[1].split("</table>")[0].count("<tr><td>") == 5
    assert "The residuals (mean of the last 5 prompt tokens) of the direction prompts" in page
    # The custom markers have no measured error rates: the front, the chosen trial and the page say the counts are uncorrected.
    note = "uncorrected: no measured error rates for this judge"
    assert "true refusals" in output and f"True refusals: {note}" in " ".join(output.split())
    assert f"<tr><th>True refusals</th><td>{note}</td></tr>" in page
    # The examples action's responses are the report's (generated once): its first harmful row is on the page.
    table = output[output.index("Harmful prompts, original vs trial") :]
    first_row = table.splitlines()[4].split("│")  # title, border, header, rule, first row
    assert html.escape(first_row[1].strip()) in page and html.escape(first_row[3].strip()) in page


@pytest.mark.slow
def test_a_finished_study_gets_its_report_and_a_saved_model_its_report_without_new_trials(
    tiny_study: dict[str, object], tiny_models: dict[str, Path]
) -> None:
    folder = Path(str(tiny_study["folder"]))
    output = heretic(
        tiny_models["llama"],
        *("--n-trials", "0", "--trial", "1", "--action", "report", "--report-file", "again.html"),
        *("--harmful-heldout-prompts", "bundled:harmful_test[8:14]"),
        cwd=folder,
    )
    assert "Searching" not in output and "Chosen trial 1" in output
    page = (folder / "again.html").read_text()
    assert re.search(r"Held-out harmful prompts \(bundled:harmful_test\[8:14\], 6 prompts the search never saw\)", page)
    assert "no held-out split" not in page
    output = heretic(tiny_models["llama"], "--n-trials", "0", "--action", "save", "--output-dir", "saved/model", cwd=folder)
    assert "Searching" not in output
    assert (folder / "saved" / "model" / "model.safetensors").is_file()
    assert "Report written to" in output and (folder / "saved" / "model.report.html").is_file()
    # other settings, another checkpoint: nothing to act on, said in one sentence
    output = heretic(tiny_models["llama"], "--n-trials", "0", "--seed", "7", "--action", "report", cwd=folder, code=2)
    assert "--n-trials 0 acts on a finished search, but the checkpoint of these settings has no finished trial" in " ".join(
        output.split()
    )


@pytest.mark.slow
def test_report_renders_in_a_headless_browser(tiny_study: dict[str, object], tmp_path: Path) -> None:
    """Chromium (the system's, driven by Playwright): no console error or network request, every section,
    one front marker per trial; the screenshot is kept as an artifact."""
    from bench import report_screenshot

    if report_screenshot.find_browser() is None or not _playwright_installed():
        message = "no headless browser: chromium (apt-get install -y chromium) and playwright (make setup) are needed"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    screenshot = tmp_path / "report.png"
    rendered = report_screenshot.render(Path(str(tiny_study["report"])), screenshot)
    print(f"report screenshot: {screenshot}")
    assert rendered.console_errors == []
    assert rendered.sections == [key for key, _ in SECTIONS]
    assert rendered.front_points == N_TRIALS
    assert rendered.plots == 7  # front, kernels, progress, importances, norms, similarities, residuals
    with Image.open(screenshot) as image:
        assert image.width == 1280 and image.height > 3000


def _playwright_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("playwright") is not None


@pytest.mark.slow
def test_pacmap_projection_where_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("pacmap") is None:
        missing = "pacmap is not installed (make setup installs it with the dev extra); PCA is used instead"
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    generator = np.random.default_rng(0)
    harmless = generator.normal(size=(40, 16))
    harmful = generator.normal(size=(40, 16)) + 3.0
    projected_harmful, projected_harmless = project_groups([harmful, harmless], "pacmap")
    assert projected_harmful.shape == (40, 2) and projected_harmless.shape == (40, 2)
    assert projected_harmful[:, 0].mean() > projected_harmless[:, 0].mean()


def test_a_file_that_is_not_a_report_is_never_replaced(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from heretic.config import Settings
    from heretic.errors import HereticError
    from heretic.export.actions import is_report, write_html_report

    notes = tmp_path / "notes.html"
    notes.write_text("<html>my notes</html>")
    session = SimpleNamespace(settings=Settings(report_file=str(notes)), last_report=None, study=None)
    with pytest.raises(
        HereticError, match="exists and is not a Heretic report; choose another --report-file or pass --overwrite"
    ):
        write_html_report(session, SimpleNamespace(number=0), None, confirm=None, output_dir=tmp_path / "out")  # type: ignore[arg-type]
    assert notes.read_text() == "<html>my notes</html>"
    data = study_report_data(synthetic_study(2), "m", chosen=0, judge="markers", n_prompts=8, num_layers=4)
    from heretic.report.html import write_report

    assert is_report(write_report(data, tmp_path / "earlier.html")) and not is_report(notes)
