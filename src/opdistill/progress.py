"""Progress display: a rich bar on a terminal, a line every few steps elsewhere, or nothing."""

from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, step: int, fields: dict[str, float]) -> None:
        pass


class ProgressBar(NullProgress):
    """Step, loss, teacher_kl, last eval accuracy, tokens/s and ETA."""

    def __init__(self, title: str, total: int, start: int):
        self.title, self.total, self.start = title, total, start
        self.interactive = sys.stderr.isatty()
        self.last_line = 0.0
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=False,
            disable=not self.interactive,
        )
        self.task = self.progress.add_task(title, total=total, completed=start, info="")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, step: int, fields: dict[str, float]) -> None:
        info = "  ".join(f"{k} {v:.4g}" for k, v in fields.items())
        self.progress.update(self.task, completed=step, info=info)
        if not self.interactive and (time.monotonic() - self.last_line > 10 or step == self.total):
            self.last_line = time.monotonic()
            print(f"{self.title} step {step}/{self.total}  {info}", file=sys.stderr, flush=True)
