"""Full-vocabulary divergences against math.md §15 (I2, I6a-d, I6f) and against TRL's GKD loss."""

from __future__ import annotations

import math
import os

import pytest
import torch

from opdistill.objectives.losses import Normalizer, generalized_jsd

V = 9


def _logits(seed: int, shape=(V,)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * 2


def _kl(a_logits, b_logits):
    a, b = a_logits.log_softmax(-1), b_logits.log_softmax(-1)
    return (a.exp() * (a - b)).sum(-1)


def divergence_loss(student, teacher_logp, mask, beta, temperature=1.0):
    """Summed masked divergence, as the loop forms it with aggregation=sum."""
    return Normalizer("sum", 0, 0)(generalized_jsd(student, teacher_logp, beta, temperature), mask)


def _jsd(z, t, beta):
    """JSD_β at one state: β = weight of the teacher in the mixture."""
    return float(generalized_jsd(z[None, None], t.log_softmax(-1)[None, None], beta)[0, 0])


def test_endpoints_are_exactly_forward_and_reverse_kl():
    z, t = _logits(0), _logits(1)
    assert _jsd(z, t, 0.0) == pytest.approx(float(_kl(t, z)), abs=1e-12)  # forward KL(q ‖ p)
    assert _jsd(z, t, 1.0) == pytest.approx(float(_kl(z, t)), abs=1e-12)  # reverse KL(p ‖ q)


def test_i6ab_scaled_limits():
    z, t = _logits(2), _logits(3)
    eps = 1e-5
    assert _jsd(z, t, eps) / eps == pytest.approx(float(_kl(t, z)), rel=1e-3)
    assert _jsd(z, t, 1 - eps) / eps == pytest.approx(float(_kl(z, t)), rel=1e-3)


def test_i6c_argument_order_symmetry():
    z, t = _logits(4), _logits(5)
    for beta in (0.1, 0.5, 0.8):
        assert _jsd(z, t, beta) == pytest.approx(_jsd(t, z, 1 - beta), abs=1e-12)


def test_i6d_bounds_and_identity():
    for seed in range(20):
        z, t = _logits(seed), _logits(100 + seed)
        for beta in (0.1, 0.5, 0.9):
            value = _jsd(z, t, beta)
            assert 0 <= value <= -beta * math.log(beta) - (1 - beta) * math.log(1 - beta) + 1e-12
        assert _jsd(z, z, 0.5) == pytest.approx(0.0, abs=1e-12)


def test_i2_and_forward_kl_gradients():
    t = _logits(7)
    for beta, expected in ((1.0, "reverse"), (0.0, "forward")):
        z = _logits(6).requires_grad_(True)
        loss = divergence_loss(z[None, None], t.log_softmax(-1)[None, None], torch.ones(1, 1), beta)
        loss.backward()
        p, q = z.detach().softmax(-1), t.softmax(-1)
        if expected == "reverse":
            ell = p.log() - q.log()
            torch.testing.assert_close(z.grad, p * (ell - (p * ell).sum()))  # I2
        else:
            torch.testing.assert_close(z.grad, p - q)  # ∇ KL(q ‖ p) = p - q


def test_i6f_gradient_limit():
    t = _logits(9)
    z = _logits(8).requires_grad_(True)
    beta = 1e-6
    (generalized_jsd(z[None, None], t.log_softmax(-1)[None, None], beta)[0, 0] / beta).backward()
    torch.testing.assert_close(z.grad, z.detach().softmax(-1) - t.softmax(-1), atol=1e-4, rtol=1e-4)


def test_temperature_applies_to_both_sides():
    z, t = _logits(10, (2, 3, V)), _logits(11, (2, 3, V))
    tau = 2.0
    tempered = generalized_jsd(z, t.log_softmax(-1), 0.5, temperature=tau)
    torch.testing.assert_close(tempered, generalized_jsd(z / tau, (t / tau).log_softmax(-1), 0.5))
    torch.testing.assert_close(generalized_jsd(z, t.log_softmax(-1), 0.5, 1.0), generalized_jsd(z, t, 0.5))


def test_padding_invariance():
    z, t = _logits(12, (2, 4, V)), _logits(13, (2, 4, V)).log_softmax(-1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    short = divergence_loss(z[:, :3], t[:, :3], mask[:, :3], 0.5)
    padded = divergence_loss(z, t, mask, 0.5)
    torch.testing.assert_close(short, padded)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_trl_generalized_jsd_loss(beta, temperature):
    """Independent reference: TRL's GKDTrainer.generalized_jsd_loss, value and gradient (test-only
    dependency)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    student = _logits(14, (3, 5, V)).float().requires_grad_(True)
    teacher = _logits(15, (3, 5, V)).float()
    reference = GKDTrainer.generalized_jsd_loss(
        student, teacher, beta=beta, temperature=temperature, reduction="sum"
    )
    (reference_grad,) = torch.autograd.grad(reference, student)
    ours = divergence_loss(student, teacher.log_softmax(-1), torch.ones(3, 5), beta, temperature)
    (ours_grad,) = torch.autograd.grad(ours, student)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_grad, reference_grad, atol=1e-6, rtol=1e-5)
