"""Where a step's time goes: ``timed(metrics, phase)`` adds the seconds spent in its block to
``metrics["time_<phase>_s"]``. The phases of a step (metrics.jsonl, the progress line): ``sampling`` (the
student's rollouts, TRD refinements, rewards, or the completions an SFT step trains on), ``teacher``
(scoring, and the reference model of a ref-KL term), ``shaping``, ``diagnostics``, ``backward`` (forward,
loss and backward of every micro-batch), ``optimizer`` (clipping and the update) and ``sync`` (pushing the
weights into a vLLM rollout engine); ``step_s`` is their sum plus the loop's own bookkeeping. Evaluations
log their ``eval_s`` in eval.jsonl."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

PHASES = ("sampling", "teacher", "shaping", "diagnostics", "backward", "optimizer", "sync")


@contextlib.contextmanager
def timed(metrics: dict, phase: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        key = f"time_{phase}_s"
        metrics[key] = metrics.get(key, 0.0) + time.perf_counter() - started
