"""S7 (the shared top-k mass) and S8 (conditions for OPD and the no_progress alarm) of benchmarks/science/:
their analysis on hand-made runs, the addition task's swap option their mismatched teacher is trained on,
and both scripts end to end at a tiny size. Their outcomes are measured by the scripts, not asserted here."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import pytest

from opdistill.data.tasks import load_task
from opdistill.data.tasks.addition import problem


def test_swap_off_is_todays_task_and_on_swaps_every_step_with_the_same_answers():
    assert problem(4721, 389, 4).completion == "1+9+0=10,2+8+1=11,7+3+1=11,4+0+1=05>5110"
    assert problem(4721, 389, 4, swap=True).completion == "9+1+0=10,8+2+1=11,3+7+1=11,0+4+1=05>5110"
    plain = load_task(task="addition", task_options={"digits": 4, "test_size": 50}, seed=0)
    off = load_task(task="addition", task_options={"digits": 4, "test_size": 50, "swap": False}, seed=0)
    on = load_task(task="addition", task_options={"digits": 4, "test_size": 50, "swap": True}, seed=0)
    plain_examples = [plain.train[i] for i in range(200)] + plain.test
    # the default task byte for byte as before the option existed (shipped assets were trained on it)
    text = "\n".join(ex.completion for ex in plain_examples)
    assert zlib.crc32(text.encode()) == 1798469050
    assert [off.train[i] for i in range(200)] + off.test == plain_examples
    swapped = [on.train[i] for i in range(200)] + on.test
    step = re.compile(r"(\d)\+(\d)\+(\d)=(\d\d)")
    for ex, sw in zip(plain_examples, swapped, strict=True):
        assert (sw.prompt, sw.answer) == (ex.prompt, ex.answer) and on.verify(sw.completion, sw)
        steps, swapped_steps = step.findall(ex.completion), step.findall(sw.completion)
        assert len(steps) == 4 and swapped_steps == [(b, a, c, s) for a, b, c, s in steps]
    assert any(sw.completion != ex.completion for ex, sw in zip(plain_examples, swapped, strict=True))


def _run(common, name: str, metrics: list[dict], evals: list[dict], tmp_path: Path, alarms=()):
    out = tmp_path / name
    out.mkdir()
    (out / "alarms.jsonl").write_text("".join(json.dumps(a) + "\n" for a in alarms))
    return common.Run(name, out, {"steps": len(metrics)}, metrics, evals)


def test_s8_reads_accuracy_teacher_kl_ends_and_alarms(science, tmp_path):
    common, s8 = science("common"), science("s8_conditions")
    metrics = [{"step": s, "teacher_kl": float(s), "flops": 10.0 * s} for s in range(1, 31)]
    evals = [
        {"step": 0, "greedy_acc": 0.6},
        {"step": 15, "greedy_acc": 0.1},
        {"step": 30, "greedy_acc": 0.02},
    ]
    alarms = [
        {"step": 20, "alarm": "no_progress: over the last 4 evaluations: the student may be ..."},
        {"step": 25, "alarm": "teacher_kl_rising: the mean teacher_kl rose: 1, 2, 3."},
    ]
    runs = {
        "swap": _run(common, "swap", metrics, evals, tmp_path, alarms),
        "control": _run(common, "control", metrics[:12], evals[:2], tmp_path),
    }
    rows = s8.analyse(runs, {"swap": 0.99, "shipped": 0.98})
    swap, control = rows
    assert swap["teacher_acc"] == 0.99 and control["teacher_acc"] == 0.98  # each run's own teacher
    assert swap["acc"] == (0.6, 0.02) and control["acc"] == (0.6, 0.1)
    assert swap["kl"] == pytest.approx((5.5, 25.5))  # steps 1-10 and 21-30
    assert control["kl"] == pytest.approx((5.5, 7.5))  # steps 1-10 and 3-12
    assert swap["alarms"] == [(20, "no_progress"), (25, "teacher_kl_rising")] and control["alarms"] == []
    lines = s8.table(rows)
    assert "no_progress (20), teacher_kl_rising (25)" in lines[2] and "0.600 → 0.020" in lines[2]
    assert lines[3].endswith("| none |")


def test_s7_takes_the_first_diagnostics_and_the_mean_of_the_last_five_and_when_both_masses_reach_97(
    science, tmp_path
):
    common, s7 = science("common"), science("s7_shared_mass")
    metrics = []
    for step in range(1, 41):
        row = {"step": step, "flops": 100.0 * step, "teacher_kl": 0.5}
        if step % 5 == 0:  # diagnostics steps: the masses climb 0.80, 0.83, ...; the teacher's lags
            i = step // 5 - 1
            row |= {
                "overlap": 0.5 + 0.05 * i,
                "overlap_mass_student": 0.80 + 0.03 * i,
                "overlap_mass_teacher": 0.80 + 0.025 * i,
                "overlap_advantage": -0.1 + 0.01 * i,
            }
        metrics.append(row)
    evals = [{"step": 0, "greedy_acc": 0.6}, {"step": 40, "greedy_acc": 0.9}]
    flat = [
        m | {"overlap_mass_student": 0.99, "overlap_mass_teacher": 0.5} for m in metrics if "overlap" in m
    ]
    runs = {
        "control": _run(common, "control", metrics, evals, tmp_path),
        "tiny": _run(common, "tiny", flat, evals, tmp_path),
    }
    control, tiny = s7.analyse(runs)
    assert control["overlap_mass_student"] == pytest.approx((0.80, 0.80 + 0.03 * 5))  # mean of i = 3..7
    assert control["overlap_mass_teacher"] == pytest.approx((0.80, 0.80 + 0.025 * 5))
    assert control["overlap"] == pytest.approx((0.5, 0.75)) and control["acc"] == (0.6, 0.9)
    assert control["overlap_advantage"] == pytest.approx((-0.1, -0.05))
    # the student's mass passes 0.97 at i = 6 (step 35) but the teacher's only at i = 7 (step 40)
    assert control["reached"] == 4000.0
    assert tiny["reached"] is None  # the student's mass alone is not the shared set carrying both
    lines = s7.table([control, tiny])
    assert "4.00e+03 FLOPs" in lines[2] and lines[3].endswith("| never |")


def test_s7_runs_end_to_end_at_a_tiny_size(science, tmp_path):
    rows = science("s7_shared_mass").main(
        ["--smoke", "--threads", "1", "--out", str(tmp_path / "runs"), "--report", str(tmp_path / "s7")]
    )
    assert [row["run"] for row in rows] == ["control", "swap", "tiny"]
    assert (tmp_path / "s7.md").read_text().count("|") > 20 and (tmp_path / "s7.png").stat().st_size > 0
    configs = {
        name: (tmp_path / "runs" / name / "config.yaml").read_text() for name in ("control", "swap", "tiny")
    }
    assert "swap: true" in (tmp_path / "runs" / "teachers" / "swap" / "config.yaml").read_text()
    assert "topk: 3" in configs["control"] and "preset: d8l1" in configs["tiny"]
    assert "teachers/swap/final" in configs["swap"]


def test_s8_runs_end_to_end_at_a_tiny_size(science, tmp_path):
    rows = science("s8_conditions").main(
        ["--smoke", "--threads", "1", "--out", str(tmp_path / "runs"), "--report", str(tmp_path / "s8")]
    )
    assert [row["method"] for row in rows] == [
        "control",
        "swap",
        "peer",
        "self",
        "swap_cold",
        "swap_select",
        "tiny",
    ]
    assert (tmp_path / "s8.md").read_text().count("|") > 30 and (tmp_path / "s8.png").stat().st_size > 0
    runs = tmp_path / "runs"
    assert (runs / "swap_cold" / "cold_start.jsonl").is_file() and rows[3][
        "steps"
    ] > 0  # budget left to distil
    assert "select_fraction: 0.25" in (runs / "swap_select" / "config.yaml").read_text()
    assert "teachers/peer/final" in (runs / "peer" / "config.yaml").read_text()
    for run_dir in (runs / name for name in ("control", "tiny")):  # each stopped on the FLOP budget
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["flops"] >= 1e9 and "teacher_kl" in last
