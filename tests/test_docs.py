"""The docs a clone carries match the code: generated pages are current, and every "§" the code and tests cite
names a file in docs/ whose section exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from opdistill.config import ObjectiveConfig, config_keys, describe, reference_markdown
from opdistill.objectives.registry import OBJECTIVES, TABLE_BEGIN, TABLE_END, objectives_table

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
STALE = "out of date: run `make docs` (python scripts/write_docs.py) and commit the result"


def test_the_configuration_page_is_generated_from_the_config_dataclasses():
    assert (DOCS / "configuration.md").read_text() == reference_markdown(), (
        f"docs/configuration.md is {STALE}"
    )
    page = reference_markdown()
    for line in describe().splitlines():  # every key --help lists is on the page
        assert f"| `{line.split('=')[0].strip()}` |" in page
    uncommented = [key for _, key, _, comment in config_keys() if not comment]
    assert not uncommented, f"config keys without the comment that documents them: {uncommented}"


def test_the_objectives_table_is_generated_from_the_registry():
    text = (DOCS / "objectives.md").read_text()
    assert TABLE_BEGIN in text and TABLE_END in text, "docs/objectives.md lost its generated-table markers"
    table = text.split(TABLE_BEGIN)[1].split(TABLE_END)[0].strip("\n")
    assert table == objectives_table(ObjectiveConfig()).strip("\n"), (
        f"the objectives table of docs/objectives.md is {STALE}"
    )
    assert all(f"| `{name}` |" in table for name in OBJECTIVES)


def test_every_section_reference_names_a_docs_file_and_section():
    cited = subprocess.run(
        ["git", "grep", "-hoE", r"[A-Za-z_]+\.md §[0-9]+(\.[0-9]+)?", "--", "src", "tests"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.split("\n")
    references = {tuple(line.split(" §")) for line in cited if line}
    assert references, "the code cites no section at all: the pattern is wrong"
    for name, section in sorted(references):
        page = DOCS / name
        assert page.is_file(), f"code or tests cite {name} §{section}, and docs/{name} does not exist"
        headings = re.findall(r"^#+ (\d+(?:\.\d+)*)[. ]", page.read_text(), flags=re.M)
        assert section in headings, (
            f"code or tests cite {name} §{section}, a section docs/{name} does not have"
        )
