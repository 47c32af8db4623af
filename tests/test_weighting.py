"""Token weights, masks and advantages (math.md §7, §8, §12) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from opdistill.objectives import weighting
from opdistill.objectives.weighting import FKL, RKL, SKIP

F64 = torch.float64


def _mask(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def _close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype))


def test_position_decay_values_hard_limit_and_mask():
    mask = _mask([1, 1, 1, 0], [1, 1, 0, 0])
    w = weighting.position_decay(mask, alpha=2.0, max_len=4)
    _close(w, [[1.0, math.exp(-0.5), math.exp(-1.0), 0.0], [1.0, math.exp(-0.5), 0.0, 0.0]])
    cut = weighting.position_decay(mask, alpha=2.0, max_len=4, hard_limit=2)
    _close(cut, [[1.0, math.exp(-0.5), 0.0, 0.0], [1.0, math.exp(-0.5), 0.0, 0.0]])


def test_window_mask_first_and_last_count_masked_tokens_only():
    mask = _mask([0, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0])
    assert (
        weighting.window_mask(mask, 2, "first").tolist()
        == _mask([0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]).tolist()
    )
    assert (
        weighting.window_mask(mask, 2, "last").tolist()
        == _mask([0, 0, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0]).tolist()
    )
    with pytest.raises(ValueError):
        weighting.window_mask(mask, 2, "middle")  # type: ignore[arg-type]


def test_window_mask_random_is_reproducible_and_uniform():
    mask = _mask([1, 0, 1, 1, 0, 1, 1, 0]).expand(4000, -1)
    picked = weighting.window_mask(mask, 2, "random", torch.Generator().manual_seed(0))
    assert (picked.sum(1) == 2).all() and not (picked & ~mask).any()
    again = weighting.window_mask(mask, 2, "random", torch.Generator().manual_seed(0))
    other = weighting.window_mask(mask, 2, "random", torch.Generator().manual_seed(1))
    assert torch.equal(picked, again) and not torch.equal(picked, other)
    frequency = picked.double().mean(0)[mask[0]]  # each of 5 masked tokens is drawn with probability 2/5
    assert (frequency - 0.4).abs().max() < 0.03


def test_iw_opd_weights_by_hand():
    teacher = torch.tensor([[1.0, -2.0, 1.0, -math.inf], [0.3, 0.3, 0.3, 0.3]], dtype=F64)
    rollout = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3]], dtype=F64)
    mask = _mask([1, 1, 1, 0], [1, 1, 1, 1])
    w, metrics = weighting.iw_opd_weights(teacher, rollout, mask, gamma=0.5)
    # row 0: |a| = 1, 2, 1 so S = 4, P = 0, 1, 3 and w = 1 + 0.5 (1 - P/4); row 1: no discrepancy, all 1 + γ
    _close(w, [[1.5, 1.375, 1.125, 0.0], [1.5, 1.5, 1.5, 1.5]])
    assert metrics["iw_weight_min"] == pytest.approx(1.125) and metrics["iw_weight_max"] == pytest.approx(1.5)
    assert metrics["iw_weight_mean"] == pytest.approx((1.5 + 1.375 + 1.125 + 4 * 1.5) / 7)


def test_i12_iw_opd_weights_start_at_one_plus_gamma_and_never_rise():
    g = torch.Generator().manual_seed(0)
    teacher, rollout = torch.randn(3, 9, generator=g), torch.randn(3, 9, generator=g)
    w, _ = weighting.iw_opd_weights(teacher, rollout, torch.ones(3, 9, dtype=torch.bool), gamma=0.7)
    torch.testing.assert_close(w[:, 0], torch.full((3,), 1.7))
    assert (w[:, 1:] <= w[:, :-1]).all() and (w >= 1).all() and (w <= 1.7 + 1e-6).all()
    assert w[:, -1].min() > 1  # the last token's own |a| is not in its prefix


def test_tip_soft_or_keeps_overconfident_wrong_token_over_mastered_one():
    # masked tokens, flat order: (h, δ) = (0, 1) Q3, (1, 0) uncertain, (0, 0) mastered, (0.5, 0.5); the padded
    # (100, 100) entries would change the min-max normalisation if they leaked in
    entropy = torch.tensor([[0.0, 1.0, 0.0], [0.5, 100.0, 100.0]], dtype=F64)
    divergence = torch.tensor([[1.0, 0.0, 0.0], [0.5, 100.0, 100.0]], dtype=F64)
    mask = _mask([1, 1, 1], [1, 0, 0])
    keep, metrics = weighting.tip_keep_mask(entropy, divergence, mask, ratio=0.5)  # s = 1, 1, 0, 0.75
    assert keep.tolist() == _mask([1, 1, 0], [0, 0, 0]).tolist() and metrics["tip_kept_frac"] == 0.5
    keep, _ = weighting.tip_keep_mask(entropy, divergence, mask, ratio=0.8)  # ⌊3.2⌋ = 3
    assert keep.tolist() == _mask([1, 1, 0], [1, 0, 0]).tolist()
    keep, _ = weighting.tip_keep_mask(entropy, divergence, mask, ratio=0.25)  # tie at s = 1: earlier wins
    assert keep.tolist() == _mask([1, 0, 0], [0, 0, 0]).tolist()


def test_tip_constant_scores_keep_the_first_tokens_and_floor_is_exact():
    flat = torch.ones(1, 100)
    keep, _ = weighting.tip_keep_mask(flat, flat, torch.ones(1, 100, dtype=torch.bool), ratio=0.29)
    assert keep.sum() == 29 and keep[0, :29].all()
    mask = _mask([0, 1, 1, 1, 1])
    keep, metrics = weighting.tip_keep_mask(torch.ones(1, 5), torch.ones(1, 5), mask, ratio=0.6)
    assert keep.tolist() == _mask([0, 1, 1, 0, 0]).tolist() and metrics["tip_kept_frac"] == 0.5
    keep, metrics = weighting.tip_keep_mask(torch.ones(1, 5), torch.ones(1, 5), mask, ratio=0.2)
    assert not keep.any() and metrics["tip_kept_frac"] == 0.0


def test_entropy_gate_is_strict_and_masked():
    gate = weighting.entropy_gate(torch.tensor([[0.5, 0.9, 0.8, 2.0]]), _mask([1, 1, 1, 0]))
    assert gate.tolist() == _mask([0, 1, 0, 0]).tolist()


def test_sequence_perplexity_ignores_padding():
    logp = torch.tensor([[-1.0, -3.0, -math.inf], [0.0, 0.0, 0.0]], dtype=F64)
    _close(weighting.sequence_perplexity(logp, _mask([1, 1, 0], [0, 0, 0])), [math.exp(2.0), 1.0])


def test_scope_weights_by_hand():
    student_ppl = torch.tensor([2.0, 4.0, 9.0, 9.0, 1.0, 3.0, 3.0, 1.0], dtype=F64)
    teacher_ppl = torch.tensor([9.0, 9.0, 2.0, 8.0, 5.0, 5.0, 5.0, 5.0], dtype=F64)
    correct = _mask(1, 1, 0, 0, 1, 1, 1, 1)
    w, metrics = weighting.scope_weights(student_ppl, teacher_ppl, correct, group_size=4)
    # group 0: correct ∝ PPL_S = 2, 4 (the less confident correct path gets more); incorrect ∝ 1/PPL_T
    # group 1: all correct ∝ 1, 3, 3, 1; its empty incorrect branch contributes nothing
    _close(w, [1 / 3, 2 / 3, 0.8, 0.2, 1 / 8, 3 / 8, 3 / 8, 1 / 8])
    assert metrics["scope_correct_frac"] == 0.75 and metrics["scope_weight_max"] == pytest.approx(0.8)
    w, _ = weighting.scope_weights(student_ppl, teacher_ppl, correct, group_size=4, tau=2.0)
    assert w[0] == pytest.approx(math.sqrt(2) / (math.sqrt(2) + 2)) and w[2] == pytest.approx(
        0.5 / (0.5 + 0.25)
    )


def test_scope_weights_sum_to_one_per_branch_and_survive_huge_perplexities():
    g = torch.Generator().manual_seed(0)
    student_ppl, teacher_ppl = (
        torch.rand(12, generator=g, dtype=F64) * 50 + 1,
        torch.rand(12, generator=g) * 50 + 1,
    )
    correct = torch.rand(12, generator=g) < 0.5
    w, _ = weighting.scope_weights(student_ppl, teacher_ppl, correct, group_size=4)
    for branch in (correct, ~correct):
        sums = (w * branch).reshape(3, 4).sum(1)
        torch.testing.assert_close(sums, branch.reshape(3, 4).any(1).to(F64))
    # PPL^(1/τ) = 1e2000 overflows float64; the log-space softmax does not
    huge, _ = weighting.scope_weights(
        torch.tensor([1e200, 1e200], dtype=F64), torch.ones(2), _mask(1, 1), 2, tau=0.1
    )
    _close(huge, [0.5, 0.5])
    with pytest.raises(ValueError):
        weighting.scope_weights(student_ppl, teacher_ppl, correct, group_size=5)


def test_grpo_advantage_by_hand():
    reward = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=F64)
    # group 0: mean 1/4, unbiased std √((0.75² + 3·0.25²)/3) = 0.5; group 1 is constant
    adv = weighting.grpo_advantage(reward, group_size=4, eps=1e-6)
    _close(
        adv,
        [0.75 / (0.5 + 1e-6), -0.25 / (0.5 + 1e-6), -0.25 / (0.5 + 1e-6), -0.25 / (0.5 + 1e-6), 0, 0, 0, 0],
    )
    _close(weighting.grpo_advantage(reward, 4, scale=False), [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    _close(weighting.grpo_advantage(reward, group_size=1), [0.0] * 8)


def test_route_weights():
    correct = _mask(1, 0)
    _close(weighting.route_weights(correct, "all"), [1.0, 1.0])
    _close(weighting.route_weights(correct, "failed_only"), [0.0, 1.0])
    _close(weighting.route_weights(correct, "correct_only"), [1.0, 0.0])
    with pytest.raises(ValueError):
        weighting.route_weights(correct, "sometimes")  # type: ignore[arg-type]


def test_dasd_advantage_by_hand():
    delta = torch.tensor([[1.0, -1.0, 2.0, 0.0, -2.0], [3.0, -3.0, math.inf, 0.0, 0.0]], dtype=F64)
    entropy = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [1.0, 2.0, math.nan, 0.0, 0.0]], dtype=F64)
    mask = _mask([1, 1, 1, 1, 1], [1, 1, 0, 0, 0])
    group_adv = torch.tensor([0.5, -1.0], dtype=F64)
    adv, metrics = weighting.dasd_advantage(delta, entropy, mask, group_adv, beta=2.0, rho=0.2, eps=0.0)

    def expected(a_g, d_bar, h, tau, sigma):
        return a_g + 2.0 * math.tanh((tau - h) / sigma) * (1 / (1 + math.exp(1 - abs(d_bar)))) * d_bar

    # row 0: mean δ 0, MAD 1.2; entropies: top-20% threshold = 0.8-quantile 0.4 + 0.2·0.1 = 0.42, MAD 0.12
    row0 = [
        expected(0.5, d / 1.2, h, 0.42, 0.12)
        for d, h in zip([1, -1, 2, 0, -2], [0.1, 0.2, 0.3, 0.4, 0.5], strict=True)
    ]
    # row 1: mean δ 0, MAD 3; entropies 1, 2: 0.8-quantile 1.8, MAD 0.5
    row1 = [expected(-1.0, 1.0, 1.0, 1.8, 0.5), expected(-1.0, -1.0, 2.0, 1.8, 0.5), 0.0, 0.0, 0.0]
    _close(adv, [row0, row1])
    assert metrics["dasd_pull_frac"] == pytest.approx(
        5 / 7
    )  # H below τ_ρ: four tokens of row 0, one of row 1


def test_dasd_constant_entropy_leaves_the_group_advantage():
    adv, _ = weighting.dasd_advantage(
        torch.tensor([[1.0, -2.0, 0.5]]),
        torch.full((1, 3), 0.7),
        torch.ones(1, 3, dtype=torch.bool),
        torch.tensor([0.3]),
    )
    _close(adv, [[0.3, 0.3, 0.3]])


def test_kat_trap_mask_on_crafted_streams():
    high, low = 9.0, 0.1
    kl = torch.tensor(
        [
            [high] * 6 + [low] * 6,  # persistent low KL from position 6: trapped there
            [high] * 6 + [low] * 2 + [high] * 4,  # one low window (< P): not trapped
            [0.0] * 12,  # masked length 5 < t_min + P·W = 6: never trapped
            [0.0] * 12,  # masked length exactly 6: trapped at t_min
            [0.0] * 2 + [high] * 10,  # low KL before t_min does not count
            [high] * 4 + [low] * 2 + [high] * 2 + [low] * 4,  # broken run, then a run of 2 from position 8
        ]
    )
    lengths = [12, 12, 5, 6, 12, 12]
    mask = torch.arange(12) < torch.tensor(lengths)[:, None]
    keep, trapped = weighting.kat_trap_mask(kl, mask, threshold=0.5, window=2, patience=2, min_position=2)
    assert trapped.tolist() == [True, False, False, True, False, True]
    kept_lengths = [6, 12, 5, 2, 12, 8]
    assert torch.equal(keep, torch.arange(12) < torch.tensor(kept_lengths)[:, None])


def test_kat_trap_mask_ignores_unmasked_kl_inside_a_window():
    kl = torch.tensor([[9.0, 9.0, 0.0, 50.0, 0.0, 0.0, 9.0], [9.0, 9.0, 9.0, 9.0, 0.0, 0.0, 9.0]])
    # row 0: the masked-out 50 would lift window [2, 4) above the threshold; row 1: window [2, 4) has no
    # masked token, so it is no evidence of agreement and the run of two low windows is broken
    mask = _mask([1, 1, 1, 0, 1, 1, 1], [1, 1, 0, 0, 1, 1, 1])
    keep, trapped = weighting.kat_trap_mask(kl, mask, threshold=0.5, window=2, patience=2, min_position=2)
    assert trapped.tolist() == [True, False]
    assert keep.tolist() == _mask([1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 1, 1, 1]).tolist()


def test_kat_threshold_ema_of_median():
    kl = torch.tensor([[1.0, 2.0, 100.0], [3.0, 10.0, 100.0]])
    mask = _mask([1, 1, 0], [1, 1, 0])
    threshold, ema = weighting.kat_threshold(kl, mask, previous_ema=None)
    assert (threshold, ema) == pytest.approx((0.625, 2.5))  # median of 1, 2, 3, 10
    threshold, ema = weighting.kat_threshold(kl, mask, previous_ema=5.0, kappa=0.5, decay=0.9)
    assert (threshold, ema) == pytest.approx((0.5 * 4.75, 4.75))


def test_sead_zones_on_crafted_entropies():
    teacher = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [100.0] * 10])
    student = torch.tensor([[0.0, 9, 1, 8, 2, 7, 3, 6, 4, 5], [100.0] * 10])
    mask = torch.tensor([[True] * 10, [False] * 10])
    # percentiles over masked tokens only: P50(H_T) = 4.5, P90(H_T) = 8.1, P50(H_S) = 4.5
    zone = weighting.sead_zones(teacher, student, mask)
    S, R, F = SKIP, RKL, FKL
    assert zone.dtype == torch.int64
    assert zone.tolist() == [[S, R, S, R, S, R, R, R, R, F], [S] * 10]
    flat_teacher = weighting.sead_zones(
        torch.ones(1, 4), torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool)
    )
    assert flat_teacher.tolist() == [[F] * 4]  # H_T is both ≤ P50 and ≥ P90: FKL wins


def test_sead_anneal_schedule():
    assert weighting.sead_anneal(0, 100) == pytest.approx(0.8)
    assert weighting.sead_anneal(50, 100) == pytest.approx(0.4)
    assert weighting.sead_anneal(100, 100) == pytest.approx(0.0, abs=1e-12)
    assert weighting.sead_anneal(150, 100) == pytest.approx(0.0, abs=1e-12)
    values = [weighting.sead_anneal(step, 100) for step in range(101)]
    assert all(a >= b for a, b in zip(values[:-1], values[1:], strict=True))


def test_prune_weights_decay_and_hard_stop_by_hand():
    overlap = torch.tensor([[1.0, 0.25, 1.0, 0.0, 0.75, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]], dtype=F64)
    mask = _mask([1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0])
    w, metrics = weighting.prune_weights(overlap, mask, eta=0.5, zeta=0.5, max_events=3, min_weight=0.3)
    # row 0: events at 1 and 3, n = 0 1 1 2 2; row 1: n = 1 2 3 4 5, stopped from n = 3
    _close(w.double(), [[1.0, 0.5, 0.5, 0.25, 0.25, 0.0], [0.5, 0.25, 0.0, 0.0, 0.0, 0.0]])
    assert metrics["prune_effective_length"] == pytest.approx((3 + 1) / 2)
    assert metrics["prune_kept_frac"] == pytest.approx(7 / 10)


def test_prune_weights_are_monotone():
    overlap = torch.rand(4, 50, generator=torch.Generator().manual_seed(0))
    w, _ = weighting.prune_weights(overlap, torch.ones(4, 50, dtype=torch.bool), max_events=10)
    assert (w[:, 1:] <= w[:, :-1]).all() and (w <= 1).all() and (w[:, -1] == 0).all()


def test_sead_competence_rises_from_its_start_to_one_at_70_percent():
    values = [weighting.sead_competence(step, 100, start=0.3) for step in range(0, 101, 10)]
    assert values[0] == pytest.approx(0.3) and values[7] == pytest.approx(1.0) and values[-1] == 1.0
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert weighting.sead_competence(35, 100, start=0.3) == pytest.approx(0.3 + 0.7 * 0.5)


def test_curriculum_stream_draws_only_prompts_within_the_competence():
    from opdistill.config import load_config
    from opdistill.data.curriculum import CurriculumStream
    from opdistill.data.examples import Example

    examples = [Example(prompt=f"p{i}", answer=str(i)) for i in range(3)]
    config = load_config(None, ["train.steps=10", "data.curriculum_start=0.3"])
    stream = CurriculumStream(examples, [0.0, 0.5, 1.0], config)
    assert {ex.prompt for ex in stream.batch(0, 50)} == {"p0"}  # c(0) = 0.3
    assert {ex.prompt for ex in stream.batch(3, 50)} == {"p0", "p1"}  # c(3) = 0.6
    assert {ex.prompt for ex in stream.batch(7, 200)} == {"p0", "p1", "p2"}  # c = 1 from 70% of the steps
    assert stream.batch(5, 20) == stream.batch(5, 20)  # a function of (seed, step): resume replays it
    hard = CurriculumStream(examples, [0.9, 0.5, 1.0], config)
    assert {ex.prompt for ex in hard.batch(0, 20)} == {"p1"}  # nothing within c(0): the easiest ones


def test_through_last_cuts_the_reward_stream_after_the_last_kept_token():
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]).bool()
    keep = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0]]).bool()
    expected = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0]]).bool()
    assert torch.equal(weighting.through_last(mask, keep), expected)
