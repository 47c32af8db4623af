"""Sequence-level identities on a tabular autoregressive model, enumerating every sequence (docs/math.md
I9a-c), the weighted-KL optima (I15a,b), the remaining single-state identities (I7, I8, I14c) and MiniLLM's
long-term advantage."""

from __future__ import annotations

import itertools
import math

import torch

from opdistill.objectives import losses

V, T = 3, 3
PREFIXES = [p for n in range(T) for p in itertools.product(range(V), repeat=n)]
SEQUENCES = list(itertools.product(range(V), repeat=T))
ALL = torch.ones(1, T, dtype=torch.bool)


def _tables(seed: int):
    """Student logits θ and teacher log-probs, one row per prefix (the state)."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64).log_softmax(-1)
    return theta, teacher


def _token_logps(theta, teacher, y):
    """[1, T] student and teacher log-probs of sequence y, token by token."""
    rows = [PREFIXES.index(tuple(y[:t])) for t in range(T)]
    student = torch.stack([theta[r].log_softmax(-1)[y[t]] for t, r in enumerate(rows)])[None]
    return student, torch.stack([teacher[r][y[t]] for t, r in enumerate(rows)])[None]


def _expected_pg_gradient(theta, teacher, discount):
    """E_{y~π}[∇ Σ_t pg_loss_t(y)] with the library's sampled reverse-KL advantage at θ = θ_old."""
    total = torch.zeros_like(theta)
    for y in SEQUENCES:
        logp, teacher_logp = _token_logps(theta, teacher, y)
        advantage, _ = losses.sampled_rkl_advantage(logp.detach(), teacher_logp, ALL, discount=discount)
        loss, _ = losses.pg_per_token(logp, logp.detach(), advantage, ALL)
        (grad,) = torch.autograd.grad(loss.sum(), theta)
        total += math.exp(float(logp.detach().sum())) * grad
    return total


def _sequence_kl(theta, teacher):
    kl = torch.zeros((), dtype=torch.float64)
    for y in SEQUENCES:
        logp, teacher_logp = _token_logps(theta, teacher, y)
        kl = kl + logp.sum().exp() * (logp - teacher_logp).sum()
    return kl


def test_i9a_full_reward_to_go_is_the_exact_sequence_kl_gradient():
    theta, teacher = _tables(0)
    (exact,) = torch.autograd.grad(_sequence_kl(theta, teacher), theta)
    torch.testing.assert_close(_expected_pg_gradient(theta, teacher, discount=1.0), exact)


def test_i9b_i9c_per_token_advantage_is_myopic_it_is_the_state_kl_gradient_at_fixed_occupancy():
    theta, teacher = _tables(1)
    (exact,) = torch.autograd.grad(_sequence_kl(theta, teacher), theta)
    myopic = _expected_pg_gradient(theta, teacher, discount=0.0)
    assert not torch.allclose(myopic, exact, atol=1e-6)  # I9b: the eq. 3 expectation is biased
    # I9c: Σ_s d(s) ∇ KL(π(·|s) ‖ π_T(·|s)), with the occupancy d(s) = P(reach prefix s) held fixed
    surrogate = torch.zeros((), dtype=torch.float64)
    for row, prefix in enumerate(PREFIXES):
        occupancy = math.prod(
            float(theta.detach()[PREFIXES.index(prefix[:t])].softmax(-1)[prefix[t]])
            for t in range(len(prefix))
        )
        logp = theta[row].log_softmax(-1)
        surrogate = surrogate + occupancy * (logp.exp() * (logp - teacher[row])).sum()
    (expected,) = torch.autograd.grad(surrogate, theta)
    torch.testing.assert_close(myopic, expected)


def _state(seed: int, size: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, generator=g, dtype=torch.float64), torch.randn(
        size, generator=g, dtype=torch.float64
    )


def test_i7_single_step_term_is_cross_entropy_minus_entropy():
    z, t = _state(2)
    p, logp, logq = z.softmax(-1), z.log_softmax(-1), t.log_softmax(-1)
    value = losses.generalized_jsd(z[None, None], t[None, None], beta=1.0)[0, 0]
    torch.testing.assert_close(value, -(p * logq).sum() - -(p * logp).sum())


def test_i8_reverse_kl_to_a_uniform_teacher_is_log_v_minus_entropy():
    z, _ = _state(3)
    p, logp = z.softmax(-1), z.log_softmax(-1)
    uniform = torch.zeros(1, 1, z.numel(), dtype=torch.float64)
    value = losses.generalized_jsd(z[None, None], uniform, beta=1.0)[0, 0]
    torch.testing.assert_close(value, math.log(z.numel()) + (p * logp).sum())


def test_i14c_k3_backprop_has_the_forward_kl_gradient_in_expectation():
    z, t = _state(4)
    q = t.softmax(-1)
    expected = torch.zeros_like(z)
    for y in range(z.numel()):
        zy = z.clone().requires_grad_(True)
        logp = zy.log_softmax(-1)[y].reshape(1, 1)
        losses.k3_per_token(logp, t.log_softmax(-1)[y].reshape(1, 1)).sum().backward()
        assert zy.grad is not None
        expected += z.softmax(-1)[y] * zy.grad
    torch.testing.assert_close(expected, z.softmax(-1) - q)  # ∇ KL(q ‖ p), not ∇ KL(p ‖ q)


def test_minillm_long_advantage_by_hand():
    student = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    teacher = torch.tensor([[-1.5, -1.0, -0.5, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    reward = [-0.5, 1.0, 0.0]  # r = -(log p_S - log p_T) on the three real tokens
    gamma = 0.5
    # R^norm_{t+1}: t = 0 → (r1 + γ r2) / 2, t = 1 → r2 / 1, t = 2 → 0; then centred over the 3 tokens
    raw = [(reward[1] + gamma * reward[2]) / 2, reward[2] / 1, 0.0]
    mean = sum(raw) / 3
    advantage = losses.minillm_long_advantage(student, teacher, mask, gamma)
    torch.testing.assert_close(advantage, torch.tensor([[raw[0] - mean, raw[1] - mean, raw[2] - mean, 0.0]]))


def _stationary(objective, r_logits):
    """d objective / d logits at r (zero at the optimum over the simplex, which the logits parametrise)."""
    r_logits = r_logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(r_logits), r_logits)
    return grad


def test_i15a_i15b_weighted_kl_optima_are_the_geometric_and_arithmetic_mixtures():
    g = torch.Generator().manual_seed(5)
    components = torch.randn(3, 1, 1, 6, generator=g, dtype=torch.float64).log_softmax(-1)  # log p_c
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)

    def reverse(r):  # Σ_c w_c KL(r ‖ p_c)
        return sum(
            w * losses.generalized_jsd(r, p, beta=1.0).sum() for w, p in zip(weights, components, strict=True)
        )

    def forward(r):  # Σ_c w_c KL(p_c ‖ r)
        return sum(
            w * losses.generalized_jsd(r, p, beta=0.0).sum() for w, p in zip(weights, components, strict=True)
        )

    geometric = (weights[:, None, None, None] * components).sum(
        0
    )  # log of normalize(exp Σ w log p), up to a constant
    arithmetic = (weights[:, None, None, None] * components.exp()).sum(0).log()
    zero = torch.zeros(1, 1, 6, dtype=torch.float64)
    torch.testing.assert_close(_stationary(reverse, geometric), zero)
    torch.testing.assert_close(_stationary(forward, arithmetic), zero)
    assert _stationary(reverse, arithmetic).abs().max() > 1e-3  # the two optima differ
    assert _stationary(forward, geometric).abs().max() > 1e-3
