"""S3's machinery (benchmarks/science/s3_topk_bias.py) at a tiny size: its gradient comparison is right where
the answer is known, its accounting of the runs is right, and it runs end to end. Its outcome is measured by
the script, not asserted here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch


def test_compare_gives_the_cosine_and_the_relative_error(science):
    s3 = science("s3_topk_bias")
    reference = torch.tensor([3.0, 0.0])
    assert s3.compare(reference, reference) == pytest.approx((1.0, 0.0))
    assert s3.compare(torch.tensor([3.0, 4.0]), reference) == pytest.approx((0.6, 4 / 3))
    assert s3.compare(-reference, reference) == pytest.approx((-1.0, 2.0))
    assert s3.compare(torch.zeros(2), reference) == (0.0, 1.0)  # a zero gradient (renorm at K = 1)


def test_every_variant_at_k_equal_to_the_vocabulary_has_the_full_reverse_kl_gradient(science):
    common, s3 = science("common"), science("s3_topk_bias")
    base = common.config(Path("unused"), [])
    vocab = 18  # the shipped pair's
    bias, mass = s3.gradient_bias(base, [2, vocab], count=1, prompts=4, seed=0)
    for support in s3.SUPPORTS:
        assert mass[support, vocab] == pytest.approx((1.0, 1.0))
        assert mass[support, 2][0] < 1 and mass[support, 2][1] < 1
        for variant in s3.VARIANTS:  # at S = V each variant is the full reverse KL (math.md §5, I5c)
            cosine, error = bias[support, variant, vocab]
            assert cosine == pytest.approx(1.0, abs=1e-6) and error < 1e-4
    # K and the variant reach the loss: a truncated support is not the full gradient, raw is not sg
    assert bias["student", "sg", 2][1] > 1e-3
    assert bias["student", "raw", 2] != pytest.approx(bias["student", "sg", 2])


def test_analyse_reads_the_spread_the_failures_and_the_alarms_of_a_run(science, tmp_path):
    common, s3 = science("common"), science("s3_topk_bias")
    metrics = [
        {"step": s, "loss": 0.1, "grad_norm": float(s), "teacher_kl": 0.5, "student_mass": 0.9}
        for s in range(1, 6)
    ]
    metrics.append({"step": 6, "loss": math.nan, "grad_norm": 99.0, "teacher_kl": 9.0, "student_mass": 0.1})
    evals = [{"step": 0, "greedy_acc": 0.6}, {"step": 3, "greedy_acc": 0.9}, {"step": 6, "greedy_acc": 0.8}]
    (tmp_path / "alarms.jsonl").write_text(json.dumps({"step": 4, "alarm": "no_progress: flat"}) + "\n")
    run = common.Run("raw", tmp_path, {"steps": 6}, metrics, evals)
    (row,) = s3.analyse({"raw": run}, last=2)
    assert row["greedy"] == (0.6, 0.8, 0.9) and row["non_finite"] == 1 and row["alarms"] == ["no_progress"]
    assert row["grad_norm"] == pytest.approx((3.0, 5.0, math.sqrt(2.0)))  # the finite steps only
    assert row["teacher_kl"] == 0.5 and row["student_mass"] == 0.9  # the last two finite steps


def test_s3_runs_end_to_end_at_a_tiny_size(science, tmp_path):
    bias, rows = science("s3_topk_bias").main(
        ["--smoke", "--out", str(tmp_path / "runs"), "--report", str(tmp_path / "s3")]
    )
    names = ["full_rkl", "raw", "sg", "renorm", "tail", "raw_teacher", "sg_teacher"]
    assert [row["name"] for row in rows] == names
    assert len(bias) == 2 * 5 * 2  # supports x variants x K
    report = (tmp_path / "s3.md").read_text()
    assert "| support | variant |" in report and "| objective | steps |" in report
    assert report.count("|") > 100 and (tmp_path / "s3.png").stat().st_size > 0
    configs = {d.name: (d / "config.yaml").read_text() for d in (tmp_path / "runs").iterdir()}
    assert sorted(configs) == sorted(names)  # (A) writes no run directory
    assert "type: full_rkl" in configs["full_rkl"]
    for name in names[1:]:
        variant, _, support = name.partition("_")
        assert "type: topk_rkl" in configs[name] and f"topk_variant: {variant}" in configs[name]
        assert "topk: 4" in configs[name] and f"topk_support: {support or 'student'}" in configs[name]
