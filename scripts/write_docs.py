"""Regenerate the docs pages derived from the code (`make docs`): docs/configuration.md from the config
dataclasses, and the objectives table of docs/objectives.md from the objective registry.
tests/test_docs.py fails when either is out of date."""

from __future__ import annotations

from pathlib import Path

from opdistill.config import ObjectiveConfig, reference_markdown
from opdistill.objectives.registry import TABLE_BEGIN, TABLE_END, objectives_table

DOCS = Path(__file__).resolve().parent.parent / "docs"


def with_objectives_table(text: str) -> str:
    """``text`` (docs/objectives.md) with the generated table between its two markers."""
    before, _, rest = text.partition(TABLE_BEGIN)
    _, _, after = rest.partition(TABLE_END)
    return f"{before}{TABLE_BEGIN}\n{objectives_table(ObjectiveConfig())}{TABLE_END}{after}"


def main() -> None:
    (DOCS / "configuration.md").write_text(reference_markdown())
    objectives = DOCS / "objectives.md"
    objectives.write_text(with_objectives_table(objectives.read_text()))


if __name__ == "__main__":
    main()
