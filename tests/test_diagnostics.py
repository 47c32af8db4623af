"""pass@k (I11) and entropy against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from opdistill.diagnostics import high_entropy_rate, log_ratio_stats, pass_at_k, token_entropy, topk_overlap


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
