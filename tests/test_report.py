"""The report builds from a recorded tiny run with every section; a slow check renders it in Chromium."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from opdistill.cli.demo import asset_dir
from opdistill.config import load_config
from opdistill.observe.report import write_report
from opdistill.training import loop

SECTIONS = (
    "Runs",
    "Did the student close the gap?",
    "Did diversity collapse?",
    "Alarms",
    "Where does the teacher's signal degrade?",
)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Two short runs: one healthy with diagnostics and sampled evals, one whose responses are all
    truncated."""
    root = tmp_path_factory.mktemp("runs")
    common = [
        f"teacher.path={asset_dir('addition-teacher')}",
        f"student.path={asset_dir('addition-student')}",
        "train.prompts_per_step=4",
        "train.steps=4",
        "train.eval_every=2",
        "train.eval_size=8",
        "train.diagnostics_every=1",
    ]
    runs = {"healthy": root / "healthy", "truncated": root / "truncated"}
    loop.run(
        load_config(None, [*common, "train.eval_samples=4", f"train.out_dir={runs['healthy']}"]),
        show_progress=False,
    )
    loop.run(
        load_config(None, [*common, "rollout.max_new_tokens=4", f"train.out_dir={runs['truncated']}"]),
        show_progress=False,
    )
    return runs


def test_report_has_every_section_plot_and_alarm(recorded, tmp_path):
    page = write_report(recorded, tmp_path).read_text()
    assert all(f"<h2>{heading}</h2>" in page.replace("&#x27;", "'") for heading in SECTIONS)
    for alt in (
        "pass@k curve",
        "Held-out greedy accuracy",
        "Teacher KL",
        "High-entropy-token rate",
        "per-position KL of healthy",
        "per-position KL of truncated",
        "Top-k overlap",
        "Truncation rate",
    ):
        assert f'alt="{alt}' in page, alt
    assert "truncation_collapse" in page and "pass@4" in page and "distinct_answers" in page
    assert page.count("data:image/png;base64,") >= 10  # self-contained: every plot embedded
    assert 'src="http' not in page and 'href="http' not in page  # opens offline


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)"
)
def test_report_renders_in_headless_chromium(recorded, tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from PIL import Image
    from screenshot_report import screenshot

    png = screenshot(write_report(recorded, tmp_path), tmp_path / "report.png", height=3000)
    image = Image.open(png).convert("L")
    assert image.size == (1000, 3000)
    assert len(image.resize((50, 150)).getcolors(maxcolors=2500) or []) > 20  # drawn plots, not a blank page
