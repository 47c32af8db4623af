"""pass@k (I11) and entropy against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from opdistill.diagnostics import mean_entropy, pass_at_k


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


def test_mean_entropy_of_known_distributions():
    uniform = torch.zeros(1, 1, 8)
    one_hot = torch.tensor([[[0.0, -1e9, -1e9]]])
    logits = torch.cat([uniform, torch.nn.functional.pad(one_hot, (0, 5), value=-1e9)], dim=1)
    assert mean_entropy(logits, torch.tensor([[1, 0]]).bool()) == pytest.approx(math.log(8))
    assert mean_entropy(logits, torch.tensor([[1, 1]]).bool()) == pytest.approx(math.log(8) / 2)
