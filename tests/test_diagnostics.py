"""pass@k (I11), entropy, overlap, position buckets, length pathology and diversity against hand-computed
values."""

from __future__ import annotations

import math
import random
import string

import pytest
import torch

from opdistill.observe.diagnostics import (
    abs_log_ratio_quantiles,
    distinct_answers,
    distinct_n,
    diversity_collapse,
    entropy_gap,
    gap_recovery,
    high_entropy_rate,
    log_ratio_stats,
    ngram_repeat_mask,
    no_progress,
    overlap_stats,
    pass_at_k,
    position_buckets,
    relative_buckets,
    repeated_token_rate,
    repetition_rate,
    rising,
    teacher_rank,
    token_entropy,
    topk_overlap,
    truncation_rate,
)


@pytest.mark.parametrize("n,c,k", [(10, 3, 1), (10, 3, 4), (16, 0, 4), (16, 16, 16), (20, 5, 16), (7, 2, 7)])
def test_i11_product_form_equals_binomial_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_i11_pass_at_1_is_fraction_correct_and_unbiased():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    n, k, rho = 8, 3, 0.3
    expected = sum(math.comb(n, c) * rho**c * (1 - rho) ** (n - c) * pass_at_k(n, c, k) for c in range(n + 1))
    assert expected == pytest.approx(1 - (1 - rho) ** k)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_token_entropy_and_high_entropy_rate_of_known_distributions():
    uniform = torch.zeros(1, 1, 8)
    one_hot = torch.nn.functional.pad(torch.tensor([[[0.0, -1e9, -1e9]]]), (0, 5), value=-1e9)
    entropy = token_entropy(torch.cat([uniform, one_hot], dim=1))
    torch.testing.assert_close(entropy, torch.tensor([[math.log(8), 0.0]]))
    mask = torch.tensor([[1, 1]]).bool()
    assert high_entropy_rate(entropy, mask) == 0.5  # log 8 = 2.08 nats > 0.8; the one-hot token is below
    assert high_entropy_rate(entropy, mask, threshold=3.0) == 0.0
    assert high_entropy_rate(entropy, torch.tensor([[1, 0]]).bool()) == 1.0


def test_log_ratio_stats_by_hand():
    log_ratio = torch.tensor([[0.5, -1.0, 2.0], [-0.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]]).bool()
    stats = log_ratio_stats(log_ratio, mask)
    assert stats["teacher_kl"] == pytest.approx((0.5 - 1.0 + 2.0 - 0.5) / 4)
    assert stats["abs_log_ratio"] == pytest.approx((0.5 + 1.0 + 2.0 + 0.5) / 4)
    assert stats["positive_log_ratio_frac"] == pytest.approx(0.5)
    assert log_ratio_stats(log_ratio, torch.zeros(2, 3).bool())["teacher_kl"] == 0.0


def test_topk_overlap_against_hand_counted_sets():
    student = torch.tensor([[[1, 2, 3, 4], [5, 6, 7, 8], [0, 1, 2, 3]]])
    teacher = torch.tensor([[[4, 3, 9, 10], [8, 7, 6, 5], [4, 5, 6, 7]]])
    overlap = topk_overlap(student, teacher)  # {3, 4} shared; all shared in another order; none shared
    torch.testing.assert_close(overlap, torch.tensor([[0.5, 1.0, 0.0]]))
    with pytest.raises(ValueError):
        topk_overlap(student, teacher[..., :2])


def test_overlap_stats_against_hand_computed_sets_masses_and_advantage():
    log = math.log
    # k = 2; every row lists the student's (or teacher's) top-2 ids and their full-vocabulary probabilities
    student_ids = torch.tensor([[[0, 1], [2, 3], [0, 1], [0, 1], [5, 6]]])
    student_p = torch.tensor(
        [[[0.5, 0.3], [0.4, 0.2], [0.5, 0.3], [0.5, 0.3], [0.0, 0.0]]], dtype=torch.float64
    )
    teacher_ids = torch.tensor([[[1, 0], [3, 2], [1, 4], [2, 3], [5, 6]]])
    teacher_p = torch.tensor(
        [[[0.6, 0.2], [0.3, 0.6], [0.4, 0.3], [0.5, 0.2], [0.0, 0.0]]], dtype=torch.float64
    )
    mask = torch.tensor([[1, 1, 1, 1, 0]]).bool()  # the last position holds -inf log-probs: masked out
    stats = overlap_stats(student_ids, student_p.log(), teacher_ids, teacher_p.log(), mask)
    # I = {0, 1}, {2, 3}, {1}, {} at the four masked positions
    assert stats["overlap"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert stats["overlap_mass_student"] == pytest.approx((0.8 + 0.6 + 0.3 + 0) / 4)
    assert stats["overlap_mass_teacher"] == pytest.approx((0.8 + 0.9 + 0.4 + 0) / 4)
    # position 0: p̄ = (5/8, 3/8), q̄ = (1/4, 3/4); position 1: p̄ = q̄ = (2/3, 1/3) although the masses differ;
    # position 2: a single shared id, p̄ = q̄ = 1; position 3 has an empty I and is left out
    advantage_0 = (5 / 8 * log((1 / 4) / (5 / 8)) + 3 / 8 * log((3 / 4) / (3 / 8))) / 2
    assert stats["overlap_advantage"] == pytest.approx((advantage_0 + 0 + 0) / 3, rel=1e-12)
    assert stats["overlap"] == pytest.approx(float(topk_overlap(student_ids, teacher_ids)[mask].mean()))
    empty = overlap_stats(
        student_ids, student_p.log(), teacher_ids, teacher_p.log(), torch.zeros(1, 5).bool()
    )
    assert empty == dict.fromkeys(stats, 0.0)


def test_entropy_gap_of_known_distributions():
    uniform4 = torch.zeros(1, 1, 4, dtype=torch.float64)
    uniform2 = torch.tensor([[[0.0, 0.0, -math.inf, -math.inf]]], dtype=torch.float64)
    one_hot = torch.tensor([[[0.0, -math.inf, -math.inf, -math.inf]]], dtype=torch.float64)
    student = token_entropy(torch.cat([uniform4, one_hot, one_hot], dim=1))  # log 4, 0, 0
    teacher = token_entropy(torch.cat([one_hot, uniform2, uniform4], dim=1))  # 0, log 2, log 4
    gap = entropy_gap(student, teacher, torch.tensor([[1, 1, 0]]).bool())
    assert gap == pytest.approx((math.log(4) + math.log(2)) / 2)
    assert entropy_gap(student, student, torch.ones(1, 3).bool()) == 0.0


def test_teacher_rank_is_one_based_and_k_plus_one_when_absent():
    teacher_ids = torch.tensor([[[5, 3, 9], [1, 2, 3], [7, 8, 9]]])
    ranks = teacher_rank(teacher_ids, torch.tensor([[3, 1, 4]]))
    torch.testing.assert_close(ranks, torch.tensor([[2, 1, 4]]))
    # integer ranks go through the position buckets: positions [0, 2) and [2, ∞)
    assert position_buckets(ranks, torch.ones(1, 3).bool(), edges=(0, 2)) == [1.5, 4.0]


def test_position_buckets_by_hand_with_an_empty_bucket():
    values = torch.tensor([[1.0, 2, 3, 4, 5, 6], [10, 20, 30, 40, 50, 60]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 1], [1, 1, 1, 0, 0, 0]]).bool()
    # position 0 lies before edges[0]; [4, 5) holds only masked-out entries; [5, ∞) only row 0's 6
    buckets = position_buckets(values, mask, edges=(1, 2, 4, 5))
    assert buckets == [pytest.approx(11.0), pytest.approx(37 / 3), None, pytest.approx(6.0)]
    assert position_buckets(values, torch.zeros(2, 6).bool(), edges=(0,)) == [None]
    for edges in [(), (0, 5, 5), (5, 0)]:
        with pytest.raises(ValueError):
            position_buckets(values, mask, edges)


def test_relative_buckets_split_each_row_by_its_own_length():
    values = torch.tensor([[1.0, 2, 3, 4, 99, 99], [10, 20, 99, 99, 99, 99]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]).bool()  # lengths 4 and 2
    # halves: row 0 puts t = 0, 1 | 2, 3; row 1 puts t = 0 | 1
    assert relative_buckets(values, mask, n=2) == [pytest.approx(13 / 3), pytest.approx(9.0)]
    # quarters: ⌊4t/4⌋ = t for row 0, ⌊4t/2⌋ = 0, 2 for row 1
    assert relative_buckets(values, mask, n=4) == [5.5, 2.0, 11.5, 4.0]
    only_short_row = mask & torch.tensor([[False], [True]])
    assert relative_buckets(values, only_short_row, n=4) == [10.0, None, 20.0, None]


def test_abs_log_ratio_quantiles_interpolate_linearly():
    log_ratio = torch.tensor([[0.0, -1.0, 2.0], [-3.0, 4.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()  # |ℓ| = 0, 1, 2, 3, 4
    quantiles = abs_log_ratio_quantiles(log_ratio, mask)
    assert quantiles == {
        "abs_log_ratio_p50": pytest.approx(2.0),
        "abs_log_ratio_p90": pytest.approx(3.6),  # 0.9 · 4 = 3.6 between the 4th and 5th sorted values
        "abs_log_ratio_p99": pytest.approx(3.96),
    }
    assert abs_log_ratio_quantiles(log_ratio, mask, qs=(0.999,)) == {
        "abs_log_ratio_p99.9": pytest.approx(3.996)
    }
    assert abs_log_ratio_quantiles(log_ratio, torch.zeros(2, 3).bool()) == dict.fromkeys(quantiles, 0.0)


def test_truncation_rate():
    assert truncation_rate(torch.tensor([True, False, False, True])) == 0.5
    assert truncation_rate([False, False, True]) == pytest.approx(1 / 3)
    assert truncation_rate(torch.zeros(0, dtype=torch.bool)) == 0.0


def test_repetition_rate_flags_a_compressible_tail_only():
    rng = random.Random(0)

    def noise(chars: int) -> str:
        return "".join(rng.choices(string.ascii_letters + string.digits, k=chars))

    texts = [
        "ab" * 1000,  # tail "abab…" compresses ~60×: repetitive
        "a" * 1000,  # exactly L characters: counts
        noise(1500) + "ab" * 500,  # noisy head, repetitive tail: counts
        "ab" * 750 + noise(1000),  # repetitive head, noisy tail: does not
        noise(2000),  # random text compresses < 2×
        "ab" * 100,  # repetitive but shorter than L: does not count
    ]
    assert repetition_rate(texts, tail_chars=1000, ratio=10.0) == pytest.approx(3 / 6)
    assert repetition_rate(texts, tail_chars=1000, ratio=1e6) == 0.0
    assert repetition_rate(texts) == 0.0  # no text reaches the default L = 10,000
    assert repetition_rate([]) == 0.0
    with pytest.raises(ValueError):
        repetition_rate(texts, tail_chars=0)


def test_ngram_repeat_mask_by_hand():
    tokens = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2], [7, 7, 7, 7, 1, 2, 3, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]]).bool()
    expected = torch.tensor(
        [
            [
                0,
                0,
                0,
                0,
                0,
                1,
                1,
                0,
            ],  # (1,2,3) and (2,3,1) recur; the unmasked (3,1,2) at the end does not count
            [0, 0, 0, 1, 0, 0, 0, 0],  # (7,7,7) overlaps itself; row 0's (1,2,3) belongs to another row
        ]
    ).bool()
    torch.testing.assert_close(ngram_repeat_mask(tokens, mask, n=3), expected)
    assert repeated_token_rate(tokens, mask, n=3) == pytest.approx(3 / 15)
    torch.testing.assert_close(
        ngram_repeat_mask(torch.tensor([[4, 5, 4, 4]]), torch.ones(1, 4).bool(), n=1),
        torch.tensor([[False, False, True, True]]),
    )
    assert not ngram_repeat_mask(tokens[:, :2], mask[:, :2], n=3).any()
    assert not ngram_repeat_mask(tokens, torch.zeros_like(mask), n=3).any()
    assert repeated_token_rate(tokens, torch.zeros_like(mask)) == 0.0


def _open_opd_repetition_mask(token_ids: list[int], ngram: int) -> list[int]:
    """Open-OPD ``build_token_repetition_mask``, the loop the vectorised mask must reproduce."""
    repeat, seen = [0] * len(token_ids), set()
    for end in range(ngram - 1, len(token_ids)):
        gram = tuple(token_ids[end - ngram + 1 : end + 1])
        repeat[end] = int(gram in seen)
        seen.add(gram)
    return repeat


@pytest.mark.parametrize("n", [2, 3, 4])
def test_ngram_repeat_mask_matches_the_open_opd_loop_on_right_padded_rows(n):
    generator = torch.Generator().manual_seed(n)
    tokens = torch.randint(0, 3, (6, 40), generator=generator)
    lengths = [40, 33, 17, 5, 1, 0]
    mask = torch.arange(40)[None] < torch.tensor(lengths)[:, None]
    repeat = ngram_repeat_mask(tokens, mask, n)
    for row, length in enumerate(lengths):
        expected = _open_opd_repetition_mask(tokens[row, :length].tolist(), n) + [0] * (40 - length)
        assert repeat[row].long().tolist() == expected


def test_distinct_answers_and_distinct_n_by_hand():
    assert distinct_answers([["1", "1", "2"], ["3", "3", "3"], ["a", "b", "c"]]) == pytest.approx(2.0)
    assert distinct_answers([]) == 0.0
    assert distinct_n(["abab", "ba"], 2) == pytest.approx(2 / 4)  # ab, ba, ab | ba: pooled over responses
    assert distinct_n(["abc"], 2) == 1.0
    assert distinct_n(["aaaa"], 1) == pytest.approx(1 / 4)
    assert distinct_n(["a", ""], 2) == 0.0


def test_gap_recovery_and_alarms():
    assert gap_recovery(acc_after=0.5, acc_before=0.2, acc_teacher=0.8) == pytest.approx(0.5)
    assert gap_recovery(acc_after=0.1, acc_before=0.2, acc_teacher=0.6) == pytest.approx(-0.25)
    assert gap_recovery(acc_after=0.9, acc_before=0.7, acc_teacher=0.7) is None
    assert gap_recovery(acc_after=0.9, acc_before=0.7, acc_teacher=0.6) is None
    assert diversity_collapse(0.068, 0.185)  # EOPD's vanilla-OPD numbers: 0.37 of the teacher's rate
    assert not diversity_collapse(0.1, 0.185)
    assert not diversity_collapse(0.0, 0.0)
    assert rising([1.0, 3.0, 2.0, 3.0, 4.0], evals=3)
    assert not rising([1.0, 2.0, 2.0, 3.0], evals=3)  # strictly
    assert not rising([5.0, 1.0, 2.0], evals=3)
    assert not rising([1.0, 2.0], evals=3)  # too few evals yet
    with pytest.raises(ValueError):
        rising([1.0, 2.0], evals=1)


def test_no_progress_needs_flat_high_kl_and_no_accuracy_gain_over_the_window():
    def stalled(kl, acc, evals=3):
        return no_progress(kl, acc, evals, min_kl=0.1, flat=0.2, margin=0.01)

    assert stalled([5.0, 1.0, 1.1, 0.9], [0.5, 0.0, 0.0, 0.005])  # only the last 3 evaluations count
    assert not stalled([1.0, 1.1, 1.3], [0.0, 0.0, 0.0])  # +30%: not flat
    assert not stalled([1.0, 0.9, 0.7], [0.0, 0.0, 0.0])  # falling
    assert not stalled([0.09, 0.09, 0.09], [0.0, 0.0, 0.0])  # near zero: the student follows the teacher
    assert not stalled([1.0, 1.0, 1.0], [0.0, 0.1, 0.02])  # accuracy rose by 0.02
    assert not stalled([1.0, 1.0], [0.0, 0.0])  # too few evaluations yet
    with pytest.raises(ValueError):
        no_progress([1.0], [0.0], 1, 0.1, 0.2, 0.01)


def test_pass_k_ladder_doubles_up_to_n():
    from opdistill.observe.evaluate import pass_k_ladder

    assert (
        pass_k_ladder(1) == [1] and pass_k_ladder(16) == [1, 2, 4, 8, 16] and pass_k_ladder(6) == [1, 2, 4, 6]
    )
