"""S5's machinery (benchmarks/science/s5_horizon.py, docs/science.md) at a tiny size: its per-position
analysis reads the diagnostics right, and the script runs end to end with the intended overrides. Its outcome
is measured by the script, not asserted here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _diagnostics(step: int, bins: list[float | None], **extra) -> dict:
    """A diagnostics row: every per-position key holds ``bins``."""
    keys = ("kl_by_position", "exact_kl_by_position", "overlap_by_position", "teacher_rank_by_position")
    return {"step": step, "response_length": 40.0, **dict.fromkeys(keys, bins), **extra}


def test_s5_profiles_average_the_diagnostics_rows_bin_by_bin_skipping_empty_bins(science):
    common, s5 = science("common"), science("s5_horizon")
    metrics = [
        _diagnostics(1, [9.0, 9.0, None]),  # the warm start: the first diagnostics step
        {"step": 2, "response_length": 40.0},  # no diagnostics at this step: never averaged in
        _diagnostics(3, [100.0, 100.0, 100.0]),  # before the last two: not "late"
        _diagnostics(4, [1.0, None, None]),
        _diagnostics(5, [3.0, 2.0, None]),
    ]
    run = common.Run("opd", Path("opd"), {"steps": 5}, metrics, [])
    warm, late = s5.warm_and_late(run, "kl_by_position", last=2)
    assert warm == [9.0, 9.0, None]
    assert late == [2.0, 2.0, None]  # bin 1 from one row only, bin 2 empty in both: None, not 0
    assert s5.mean(late) == 2.0 and s5.mean([None, None]) is None
    phases = s5.phase_rows(s5.diagnostics_rows(run, "kl_by_position"), groups=2)
    assert [(label, [m["step"] for m in rows]) for label, rows in phases] == [
        ("warm start", [1]),
        ("after 2–3 steps", [3, 4]),
        ("after 4–4 steps", [5]),
    ]


def test_s5_analyse_reads_accuracy_tokens_and_late_kl_per_run(science):
    common, s5 = science("common"), science("s5_horizon")
    evals = [{"step": 0, "greedy_acc": 0.6, "flops": 0.0}, {"step": 5, "greedy_acc": 0.9, "flops": 5e9}]
    plain = [_diagnostics(s, [0.1 * s, 0.2 * s, 1.0 * s]) for s in (1, 3, 5)]
    window = [
        _diagnostics(s, [0.1, 0.3, 2.0], kept_token_frac=0.5) | {"response_length": 30.0} for s in (1, 3, 5)
    ]
    pruned = [_diagnostics(s, [0.1, 0.3, 2.0], prune_effective_length=12.0) for s in (1, 3, 5)]
    runs = {
        "opd": common.Run("opd", Path("opd"), {"steps": 5}, plain, evals),
        "first": common.Run(
            "first", Path("first"), {"steps": 5}, window, evals[:1] + [evals[1] | {"greedy_acc": 0.5}]
        ),
        "prune": common.Run("prune", Path("prune"), {"steps": 5}, pruned, evals),
        "cap": common.Run(
            "cap", Path("cap"), {"steps": 9}, plain, evals + [{"step": 9, "greedy_acc": 0.7, "flops": 6e9}]
        ),
    }
    analysis = s5.analyse(runs, last=2)
    warm, late = analysis["profiles"]["exact_kl_by_position"]
    assert warm == pytest.approx([0.1, 0.2, 1.0]) and late == pytest.approx([0.4, 0.8, 4.0])
    rows = {row["run"]: row for row in analysis["rows"]}
    assert rows["opd"]["greedy"] == (0.6, 0.9) and rows["opd"]["tokens"] == (40.0, 40.0)
    assert rows["opd"]["kl_head_tail"] == pytest.approx((0.6, 4.0))  # deciles 1..n-1 averaged, then the last
    assert rows["first"]["greedy"] == (0.6, 0.5) and rows["first"]["best"] == 0.6
    assert rows["first"]["tokens"] == (30.0, 15.0)  # kept_token_frac of the window
    assert rows["prune"]["tokens"] == (40.0, 12.0)  # Prune-OPD: its effective length
    # a capped run's deciles cover only its prefix: no KL reported; its evaluations are its own
    assert rows["cap"]["kl_head_tail"] is None and rows["cap"]["steps"] == 9
    assert rows["cap"]["greedy"] == (0.6, 0.7) and rows["cap"]["flops"] == 6e9
    lines = s5.tables(analysis, {name: name for name in runs}, topk=4)
    assert sum(line.startswith("| ") for line in lines) == 2 + 3 + 4  # two headers, three deciles, four runs
    assert any("| cap | 9 |" in line and line.endswith("| — | — |") for line in lines)


def test_s5_runs_end_to_end_at_a_tiny_size(science, tmp_path):
    analysis = science("s5_horizon").main(
        ["--smoke", "--out", str(tmp_path / "runs"), "--report", str(tmp_path / "s5")]
    )
    assert [row["run"] for row in analysis["rows"]] == ["opd", "cap", "first", "last", "prune", "decay"]
    assert (tmp_path / "s5.md").read_text().count("|") > 50 and (tmp_path / "s5.png").stat().st_size > 0
    runs = tmp_path / "runs"
    configs = {d.name: (d / "config.yaml").read_text() for d in runs.iterdir()}
    assert all("max_new_tokens: 52" in text for name, text in configs.items() if name != "cap")
    assert "max_new_tokens: 20" in configs["cap"] and "keep_checkpoints: 0" in configs["cap"]
    assert "loss_window: 20" in configs["first"] and "loss_window_from: first" in configs["first"]
    assert "loss_window: 20" in configs["last"] and "loss_window_from: last" in configs["last"]
    assert "prune: true" in configs["prune"] and "position_decay: 3.0" in configs["decay"]
    assert "loss_window: 0" in configs["opd"] and "prune: false" in configs["opd"]
    assert all("\n  topk: 4\n" in text and "type: full_rkl" in text for text in configs.values())
    # the capped run is evaluated from its checkpoints at the full length, warm start first
    evals = [json.loads(line) for line in (runs / "cap" / "full_length_eval.jsonl").read_text().splitlines()]
    assert evals[0]["step"] == 0 and len(evals) >= 2 and evals[-1]["step"] == analysis["rows"][1]["steps"]
    first = [json.loads(line) for line in (runs / "first" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["kept_token_frac"] < 1 for m in first) and "exact_kl_by_position" in first[0]
