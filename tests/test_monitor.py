"""Alarms trip on crafted metric streams, once each, and stay quiet on a healthy one (math.md §13)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

from opdistill.cli.demo import asset_dir
from opdistill.observe import monitor
from opdistill.training import loop


def _record(step, **overrides):
    healthy = {"step": step, "loss": 0.1, "grad_norm": 1.0, "teacher_kl": 1.0 / step, "truncation_rate": 0.1}
    return {**healthy, **overrides}


def _run(records, eval_every=2, state=None, accuracy=None):
    """Names of the alarms fired, in order, over a stream of step records; ``accuracy(step)`` is the
    held-out accuracy of each evaluation (none by default)."""
    state = monitor.AlarmState() if state is None else state
    names = []
    for record in records:
        evaluated = record["step"] % eval_every == 0
        acc = accuracy(record["step"]) if evaluated and accuracy is not None else None
        for message in monitor.alarms(record, state, evaluated=evaluated, accuracy=acc):
            names.append(message.split(":")[0])
    return names


def test_a_healthy_run_raises_no_alarm():
    records = [
        _record(s, student_high_entropy_rate=0.15, teacher_high_entropy_rate=0.2) for s in range(1, 21)
    ]
    assert _run(records) == []


def test_each_alarm_trips_once_on_its_stream():
    nan = [_record(1), _record(2, loss=math.nan), _record(3, grad_norm=math.inf)]
    assert _run(nan) == ["non_finite"]
    collapse = [_record(1, student_high_entropy_rate=0.05, teacher_high_entropy_rate=0.2)] * 2
    assert _run(collapse) == ["diversity_collapse"]
    truncating = [_record(s, truncation_rate=r) for s, r in enumerate([0.6, 0.7, 0.9, 1.0], start=1)]
    assert _run(truncating) == ["truncation_collapse"]
    rising = [_record(s, teacher_kl=0.1 * s) for s in range(1, 9)]  # per-eval means 0.15, 0.35, 0.55: rising
    assert _run(rising) == ["teacher_kl_rising"]


def test_near_misses_stay_quiet():
    tiny_teacher = [_record(1, student_high_entropy_rate=0.0, teacher_high_entropy_rate=0.01)]
    assert _run(tiny_teacher) == []  # a teacher that is almost never uncertain gives nothing to compare
    broken = [_record(s, truncation_rate=r) for s, r in enumerate([0.6, 0.4, 0.7, 0.8], start=1)]
    assert _run(broken) == []
    wobble = [
        _record(s, teacher_kl=kl) for s, kl in enumerate([0.3, 0.3, 0.2, 0.2, 0.4, 0.4, 0.1, 0.1], start=1)
    ]
    assert _run(wobble) == []


def test_a_resumed_run_neither_repeats_nor_forgets_an_alarm():
    state = monitor.AlarmState()
    assert _run([_record(1, truncation_rate=0.9), _record(2, truncation_rate=0.9)], state=state) == []
    resumed = copy.deepcopy(state)  # what the checkpoint carries
    assert _run([_record(3, truncation_rate=0.9)], state=resumed) == ["truncation_collapse"]
    assert _run([_record(4, truncation_rate=0.9)], state=resumed) == []


def test_an_alarm_in_a_run_is_printed_once_and_kept_in_the_run_directory(tiny_run, tmp_path, capsys):
    loop.run(tiny_run("rollout.max_new_tokens=4", "train.steps=5"), show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "alarms.jsonl").read_text().splitlines()]
    assert [(r["step"], r["alarm"].split(":")[0]) for r in rows] == [(3, "truncation_collapse")]
    assert capsys.readouterr().err.count("alarm at step 3: truncation_collapse") == 1


def test_periodic_evaluation_records_pass_at_k_and_diversity(tiny_run, tmp_path):
    config = tiny_run(
        f"student.path={asset_dir('addition-student')}",
        "train.steps=2",
        "train.eval_every=2",
        "train.eval_size=8",
        "train.eval_samples=4",
    )
    loop.run(config, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2]
    for row in rows:
        assert {"greedy_acc", "avg@4", "pass@1", "pass@2", "pass@4", "distinct_answers", "distinct_3"} <= set(
            row
        )
        assert row["pass@1"] <= row["pass@2"] <= row["pass@4"] and 1 <= row["distinct_answers"] <= 4


def test_tensorboard_receives_every_scalar_of_steps_and_evaluations(tiny_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_run(
        "train.steps=3", "train.eval_every=3", "train.diagnostics_every=2", "train.tensorboard=true"
    )
    loop.run(config, show_progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("train/teacher_kl")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("train/overlap")] == [1, 3]  # diagnostics steps 0 and 2
    assert [e.step for e in events.Scalars("eval/greedy_acc")] == [0, 3]
    assert "train/kl_by_position" not in scalars


def test_tensorboard_after_a_crash_and_resume_holds_each_step_once(tiny_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_run(
        "train.steps=5", "train.save_every=2", "train.tensorboard=true", "train.keep_checkpoints=0"
    )
    loop.run(config, stop_after=3, show_progress=False)  # steps 1-3 logged; checkpoints at 2 and 3
    # a crash after step 3 was logged but before its checkpoint: the run resumes from step 2
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_2")
    loop.run(config, resume=True, show_progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/teacher_kl")] == [1, 2, 3, 4, 5]


def test_kl_agreement_trap_alarm():
    assert _run(
        [_record(1, kl_trap_rate=0.1), _record(2, kl_trap_rate=0.3), _record(3, kl_trap_rate=0.5)]
    ) == ["kl_agreement_trap"]


def test_the_truncation_alarm_names_the_budget_an_episode_ran_out_of():
    state = monitor.AlarmState()
    records = [_record(step, truncation_rate=0.9, turns=7.0) for step in (1, 2, 3)]
    messages = [m for r in records for m in monitor.alarms(r, state, evaluated=False)]
    assert len(messages) == 1 and "env.max_turns" in messages[0] and "max_new_tokens" not in messages[0]


def _stalled(steps, kl=lambda step: 0.7, noise=0.05):
    """A failing OPD run: teacher_kl around ``kl(step)``, its per-evaluation mean (one evaluation every 2
    steps) wobbling by ``noise``."""
    return [_record(s, teacher_kl=kl(s) + noise * (-1) ** ((s + 1) // 2)) for s in range(1, steps + 1)]


def test_no_progress_trips_once_when_teacher_kl_stays_flat_and_high_and_accuracy_does_not_rise():
    stalled = _stalled(20)  # 10 evaluations
    assert _run(stalled, accuracy=lambda step: 0.0) == ["no_progress"]
    state = monitor.AlarmState()
    messages = [m for r in stalled[:8] for m in monitor.alarms(r, state, r["step"] % 2 == 0, 0.0)]
    assert len(messages) == 1 and "cold_start" in messages[0]  # at the 4th evaluation, with what to try
    assert _run(stalled) == []  # no accuracy, no verdict (an SFT-like stream or a run without a test set)


def test_no_progress_stays_quiet_while_the_student_learns_or_the_kl_is_low_or_falling():
    assert _run(_stalled(20), accuracy=lambda step: 0.02 * step) == []  # accuracy rises
    assert _run(_stalled(20, kl=lambda step: 0.05, noise=0.01), accuracy=lambda step: 0.0) == []  # near 0
    falling = _stalled(20, kl=lambda step: 2.0 / step, noise=0.0)
    assert _run(falling, accuracy=lambda step: 0.0) == []  # teacher_kl falls: the student follows


def test_no_progress_survives_a_resume():
    state = monitor.AlarmState()
    assert _run(_stalled(6), state=state, accuracy=lambda step: 0.0) == []  # 3 evaluations
    resumed = monitor.AlarmState(**dataclasses.asdict(copy.deepcopy(state)))  # as the checkpoint carries it
    rest = _stalled(12)[6:]
    assert _run(rest, state=resumed, accuracy=lambda step: 0.0) == ["no_progress"]
    assert _run(rest, state=resumed, accuracy=lambda step: 0.0) == []
    old = {
        k: v for k, v in dataclasses.asdict(state).items() if k != "acc_per_eval"
    }  # saved before the alarm
    assert monitor.AlarmState(**old).acc_per_eval == []
