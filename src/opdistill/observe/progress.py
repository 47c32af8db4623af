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

    def update(self, step: int, elapsed_s: float, fields: dict[str, float]) -> None:
        pass

    def note(self, message: str) -> None:
        """A line that must be seen (an alarm), kept above the bar."""
        print(message, file=sys.stderr, flush=True)


class ProgressBar(NullProgress):
    """Step, loss, teacher_kl, last eval accuracy, tokens/s and ETA. With a time budget the bar measures
    training seconds (the budget ends the run); otherwise steps."""

    def __init__(self, title: str, total_steps: int, start_step: int, budget_s: float = 0.0):
        self.title, self.total_steps, self.budget_s = title, total_steps, budget_s
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
        total = budget_s or total_steps
        self.task = self.progress.add_task(
            title, total=total, completed=0 if budget_s else start_step, where="", info=""
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

    def update(self, step: int, elapsed_s: float, fields: dict[str, float]) -> None:
        info = "  ".join(f"{k} {v:.4g}" for k, v in fields.items())
        where = f"step {step}" + (
            f"  {elapsed_s:.0f}/{self.budget_s:.0f} s" if self.budget_s else f"/{self.total_steps}"
        )
        self.progress.update(
            self.task, completed=elapsed_s if self.budget_s else step, where=where, info=info
        )
        if not self.interactive and (time.monotonic() - self.last_line > 10 or step == self.total_steps):
            self.last_line = time.monotonic()
            print(f"{self.title} {where}  {info}", file=sys.stderr, flush=True)
