"""Render a Heretic HTML report in the system's headless chromium and save a screenshot.

    python -m bench.report_screenshot REPORT.html OUT.png [--width 1280] [--full-page]

Playwright drives the browser the system installed (Debian: apt-get install chromium); no browser
is downloaded. Prints the console errors, the sections found and the markers of the front plot.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    """The path of a chromium-like browser on PATH (or /usr/bin/chromium), else None."""
    for name in BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


@dataclass
class Rendered:
    console_errors: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)  # ids of the <section>s
    front_points: int = 0  # markers drawn in the front plot
    plots: int = 0  # plotly graphs drawn


def render(report: Path, screenshot: Path, width: int = 1280, full_page: bool = True, clip_height: int | None = None) -> Rendered:
    """Open the report (file://, offline), wait for every plot, collect errors, write the screenshot."""
    from playwright.sync_api import sync_playwright

    browser_path = find_browser()
    if browser_path is None:
        raise FileNotFoundError("no chromium found; install it with: apt-get install -y chromium")
    result = Rendered()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.on("console", lambda message: result.console_errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: result.console_errors.append(str(error)))
        page.route(
            "http*://**", lambda route: (result.console_errors.append(f"network request: {route.request.url}"), route.abort())
        )
        page.goto(report.resolve().as_uri())
        page.wait_for_function(
            "document.querySelectorAll('.js-plotly-plot').length === document.querySelectorAll('.plotly-graph-div').length"
        )
        page.wait_for_timeout(500)
        result.sections = page.eval_on_selector_all("section", "nodes => nodes.map(n => n.id)")
        result.front_points = page.eval_on_selector_all(
            "#front-plot .scatterlayer .trace .points path.point", "nodes => nodes.length"
        )
        result.plots = page.eval_on_selector_all(".js-plotly-plot", "nodes => nodes.length")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        if clip_height:
            page.screenshot(path=str(screenshot), clip={"x": 0, "y": 0, "width": width, "height": clip_height}, full_page=True)
        else:
            page.screenshot(path=str(screenshot), full_page=full_page)
        browser.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path)
    parser.add_argument("screenshot", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=None, help="Clip the screenshot to this height (default: the whole page).")
    arguments = parser.parse_args()
    rendered = render(arguments.report, arguments.screenshot, arguments.width, clip_height=arguments.height)
    print(f"sections: {', '.join(rendered.sections)}")
    print(f"plots: {rendered.plots}; front markers: {rendered.front_points}")
    print(f"console errors: {len(rendered.console_errors)}")
    for error in rendered.console_errors:
        print(f"  {error}")
    print(f"screenshot: {arguments.screenshot.resolve()}")
    sys.exit(1 if rendered.console_errors else 0)


if __name__ == "__main__":
    main()
