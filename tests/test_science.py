"""The science experiments' machinery (benchmarks/science/, docs/science.md) at a tiny size: they run end to
end and their accounting is right. Their outcomes are measured by the scripts, not asserted here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _run(common, name: str, evals: list[tuple[int, float, float, float]]):
    """A Run whose evaluations are (step, accuracy, student FLOPs, teacher FLOPs)."""
    rows = [
        {"step": s, "greedy_acc": a, "student_flops": f, "teacher_flops": t, "flops": f + t}
        for s, a, f, t in evals
    ]
    return common.Run(name, Path(name), {}, [], rows)


def test_s1_target_is_the_best_sft_score_and_the_ratio_is_sft_over_opd_compute(science):
    common, s1 = science("common"), science("s1_compute")
    runs = {
        ("opd", 64): _run(common, "opd", [(0, 0.7, 0, 0), (10, 0.85, 10, 10), (20, 0.95, 20, 20)]),
        ("sft", 64): _run(common, "sft", [(0, 0.7, 0, 0), (10, 0.9, 30, 30), (20, 0.88, 60, 60)]),
        ("sft_pool", 64): _run(common, "sft_pool", [(0, 0.7, 0, 0), (10, 0.8, 5, 1), (20, 0.86, 10, 1)]),
    }
    (row,) = s1.analyse(runs, [64])
    assert row["target"] == 0.9 and row["sft_best"] == "sft"
    assert row["final"] == {"opd": 0.95, "sft": 0.88, "sft_pool": 0.86}
    # OPD first reaches 0.9 at step 20 (20 + 20 FLOPs); SFT reached it at step 10 (30 + 30)
    assert row["cheaper"][1] == pytest.approx(60 / 40)
    assert row["cheaper"][10] == pytest.approx((30 + 300) / (20 + 200))
    runs["opd", 64] = _run(common, "opd", [(0, 0.7, 0, 0), (10, 0.85, 10, 10)])
    assert s1.analyse(runs, [64])[0]["cheaper"][1] is None  # never reached: no ratio, not a number


def test_s1_runs_end_to_end_at_a_tiny_size(science, tmp_path):
    rows = science("s1_compute").main(
        ["--smoke", "--out", str(tmp_path / "runs"), "--report", str(tmp_path / "s1")]
    )
    assert [row["prompts"] for row in rows] == [8, 0]
    assert (tmp_path / "s1.md").read_text().count("|") > 20 and (tmp_path / "s1.png").stat().st_size > 0
    for run_dir in (tmp_path / "runs").iterdir():  # every method stopped on the FLOP budget, not on steps
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["flops"] >= 1.5e9 and last["step"] < 100_000


def test_s2_reads_pass_at_k_from_the_evaluations_and_entropy_rates_from_the_diagnostics(science):
    common, s2 = science("common"), science("s2_diversity")
    evals = [
        {"step": 0, "greedy_acc": 0.7, "pass@1": 0.3, "pass@4": 0.6, "distinct_answers": 2.5},
        {"step": 9, "greedy_acc": 0.9, "pass@1": 0.8, "pass@4": 0.85, "distinct_answers": 1.2},
    ]
    metrics = [
        {"step": s, "student_high_entropy_rate": s / 100, "teacher_high_entropy_rate": 0.2} for s in range(9)
    ]
    metrics.insert(3, {"step": 3})  # a step without diagnostics is not averaged in
    (row,) = s2.analyse({"rkl": common.Run("rkl", Path("rkl"), {}, metrics, evals)}, k=4)
    assert row["pass1"] == (0.3, 0.8) and row["passk"] == (0.6, 0.85) and row["distinct"] == (2.5, 1.2)
    assert row["her"] == pytest.approx(((4 + 5 + 6 + 7 + 8) / 500, 0.2))  # the last five diagnostics steps


def test_s2_runs_end_to_end_at_a_tiny_size(science, tmp_path):
    rows = science("s2_diversity").main(
        ["--smoke", "--out", str(tmp_path / "runs"), "--report", str(tmp_path / "s2")]
    )
    assert [row["method"] for row in rows] == ["rkl", "jsd", "eopd"]
    assert (tmp_path / "s2.md").read_text().count("|") > 20 and (tmp_path / "s2.png").stat().st_size > 0
    configs = {d.name: (d / "config.yaml").read_text() for d in (tmp_path / "runs").iterdir()}
    assert "type: jsd" in configs["jsd"] and "eopd_coef: 1.0" in configs["eopd"]
    assert "type: full_rkl" in configs["rkl"] and "eopd_coef: 0.0" in configs["rkl"]


def test_s4_runs_the_base_then_opsd_from_it_and_scores_both_views(science, tmp_path):
    rows = science("s4_opsd").main(
        ["--smoke", "--out", str(tmp_path / "runs"), "--report", str(tmp_path / "s4")]
    )
    assert [row["regime"] for row in rows] == ["rule", "answer"]
    for row in rows:
        assert {"hidden_before", "hidden_after", "shown_before", "shown_after"} <= row.keys()
    report = (tmp_path / "s4.md").read_text()
    assert report.count("|") > 12 and (tmp_path / "s4.png").stat().st_size > 0
    runs = tmp_path / "runs"
    base, opsd = (runs / "rule_base" / "config.yaml").read_text(), (runs / "rule" / "config.yaml").read_text()
    assert "shown: true" in base and "mix_plain: 0.5" in base  # the base learns to follow the shown context
    assert str(runs / "rule_base" / "final") in opsd and "teacher: frozen" in opsd  # OPSD starts from it
