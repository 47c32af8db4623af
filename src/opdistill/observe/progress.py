"""Progress display: a rich bar on a terminal, a line every few steps elsewhere, or nothing."""

from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn


class NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, step: int, spent: float, fields: dict[str, float]) -> None:
        pass

    def note(self, message: str) -> None:
        """A line that must be seen (an alarm), kept above the bar."""
        print(message, file=sys.stderr, flush=True)


class ProgressBar(NullProgress):
    """Step, loss, teacher_kl, last eval accuracy, tokens/s and ETA. With a budget (training seconds, unit
    "s", or FLOPs) the bar measures what is spent of it (the budget ends the run); otherwise steps."""

    def __init__(self, title: str, total_steps: int, start_step: int, budget: float = 0.0, unit: str = ""):
        self.title, self.total_steps, self.budget, self.unit = title, total_steps, budget, unit
        self.interactive = sys.stderr.isatty()
        self.last_line = 0.0
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[where]}"),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            disable=not self.interactive,
        )
        total = budget or total_steps
        self.task = self.progress.add_task(
            title, total=total, completed=0 if budget else start_step, where="", info=""
        )

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def note(self, message: str) -> None:
        if self.interactive:
            self.progress.console.print(message, highlight=False)
        else:
            super().note(message)

    def update(self, step: int, spent: float, fields: dict[str, float]) -> None:
        info = "  ".join(f"{k} {v:.4g}" for k, v in fields.items())
        number = "{:.0f}" if self.unit == "s" else "{:.3g}"
        of_budget = f"{number.format(spent)}/{number.format(self.budget)} {self.unit}"
        where = f"step {step}" + (f"  {of_budget}" if self.budget else f"/{self.total_steps}")
        self.progress.update(self.task, completed=spent if self.budget else step, where=where, info=info)
        if not self.interactive and (time.monotonic() - self.last_line > 10 or step == self.total_steps):
            self.last_line = time.monotonic()
            print(f"{self.title} {where}  {info}", file=sys.stderr, flush=True)
