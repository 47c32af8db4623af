"""What a run writes as it goes: JSONL logs (rank 0) and, when asked, TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path

from opdistill.errors import UserError
from opdistill.training.distributed import World


class Board:
    """TensorBoard scalars beside the JSONL logs when ``train.tensorboard`` is on: every number of a step's
    record under ``train/``, of an evaluation under ``eval/``, at the step; lists (per-position buckets)
    stay in metrics.jsonl only. A resumed run passes ``purge_step`` (its first step): what the interrupted
    session logged from that step on is hidden, as metrics.jsonl is truncated, so no step appears twice."""

    def __init__(self, run_dir: Path, enabled: bool, purge_step: int | None = None):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "train.tensorboard=true needs the tensorboard package: pip install tensorboard"
                ) from None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()

    def log(self, prefix: str, record: dict) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "step":
                self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])


class Log:
    """The run's JSONL logs (``metrics.jsonl``, ``alarms.jsonl``), written by rank 0 only."""

    def __init__(self, run_dir: Path, world: World):
        self.run_dir, self.enabled, self.files = run_dir, world.is_main, {}

    def __enter__(self) -> Log:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.files.values():
            handle.close()

    def write(self, name: str, record: dict) -> None:
        if not self.enabled:
            return
        if name not in self.files:
            self.files[name] = (self.run_dir / f"{name}.jsonl").open("a")
        self.files[name].write(json.dumps(record) + "\n")
        self.files[name].flush()
