"""What a run carries from step to step and through a checkpoint, as typed fields owned by the loop.

Other modules never write into it: one-time work (a teacher pool, a curriculum, prompt selection, a cold
start) returns its ``Cost`` and the loop charges it; shaping returns KAT's new threshold; the monitor keeps
its histories in its own ``AlarmState``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from opdistill.observe.monitor import AlarmState
from opdistill.types import COUNTERS, Cost


@dataclass
class RunState:
    step: int = 0  # optimizer steps taken
    elapsed_s: float = 0.0  # training time (one-time work included, evaluation excluded)
    bad_steps: int = 0  # non-finite steps in a row (each skipped)
    student_train_tokens: int = 0  # tokens the student's loss ran over
    student_sampled_tokens: int = 0  # tokens the student sampled
    teacher_scored_tokens: int = 0  # tokens the teacher scored
    teacher_generated_tokens: int = 0  # tokens the teacher read to write (SFT targets, pools, SKD, TRD)
    kat_ema: float | None = None  # KAT's running threshold (weighting.kat)
    alarms: AlarmState = field(default_factory=AlarmState)

    def charge(self, cost: Cost) -> None:
        """Count one-time work against the run's clock and token counters."""
        self.elapsed_s += cost.elapsed_s
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(cost, name))

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint (``from_dict`` reads them back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> RunState:
        names = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{key: value for key, value in saved.items() if key in names and key != "alarms"})
        state.alarms = AlarmState(**saved.get("alarms", {}))
        return state
