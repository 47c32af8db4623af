"""The math core against the closed forms of ALGORITHMS.md §15 (I1, I2, I3, I10, I14a) and its properties."""

from __future__ import annotations

import pytest
import torch

from opdistill import losses

V = 7


def _dist(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g, dtype=torch.float64), torch.randn(V, generator=g, dtype=torch.float64)


def test_i1_sampled_log_ratio_is_unbiased_for_reverse_kl():
    z, t = _dist(0)
    p, logp, logq = z.softmax(-1), z.log_softmax(-1), t.log_softmax(-1)
    # lay the V possible samples y side by side as positions; the advantage at each is -ℓ_y
    advantage, _ = losses.sampled_rkl_advantage(logp[None], logq[None], torch.ones(1, V, dtype=torch.bool))
    expected_log_ratio = -(p * advantage[0]).sum()
    torch.testing.assert_close(expected_log_ratio, (p * (logp - logq)).sum())


def test_i2_full_reverse_kl_value_and_gradient():
    z, t = _dist(1)
    z.requires_grad_(True)
    teacher_logp = t.log_softmax(-1)
    loss, metrics = losses.divergence_loss(
        z[None, None], teacher_logp[None, None], torch.ones(1, 1), 1.0, beta=1.0
    )
    loss.backward()
    p, ell = z.detach().softmax(-1), z.detach().log_softmax(-1) - teacher_logp
    kl = (p * ell).sum()
    torch.testing.assert_close(loss.detach().double(), kl)
    torch.testing.assert_close(z.grad, p * (ell - kl))  # I2
    assert metrics["divergence"] == pytest.approx(float(kl))


def test_i3_detached_advantage_pg_is_exact_in_expectation():
    z, t = _dist(2)
    teacher_logp = t.log_softmax(-1)
    p = z.softmax(-1)
    expected_grad = torch.zeros(V, dtype=torch.float64)
    for y in range(V):  # enumerate E_{y~p}[ grad of the PG loss for sample y ]
        zy = z.clone().requires_grad_(True)
        logp_all = zy.log_softmax(-1)
        logp_BT = logp_all[y].reshape(1, 1)
        advantage, _ = losses.sampled_rkl_advantage(
            logp_BT.detach(), teacher_logp[y].reshape(1, 1), torch.ones(1, 1)
        )
        loss, _ = losses.pg_loss(logp_BT, logp_BT.detach(), advantage, torch.ones(1, 1), 1.0)
        loss.backward()
        expected_grad += p[y] * zy.grad
    ell = z.log_softmax(-1) - teacher_logp
    kl = (p * ell).sum()
    torch.testing.assert_close(expected_grad, p * (ell - kl))


def test_i10_discounted_future_sum():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).bool()
    torch.testing.assert_close(losses.discounted_future_sum(values, mask, 0.0), values * mask)
    full = losses.discounted_future_sum(values, mask, 1.0)
    torch.testing.assert_close(full, torch.tensor([[10.0, 9.0, 7.0, 4.0], [11.0, 6.0, 0.0, 0.0]]))
    gamma = 0.5
    out = losses.discounted_future_sum(values, mask, gamma)
    for t in range(3):  # A_t = v_t + γ A_{t+1}
        torch.testing.assert_close(out[0, t], values[0, t] + gamma * out[0, t + 1])
    # padding resets the sum: appending masked tokens changes nothing
    padded = losses.discounted_future_sum(
        torch.cat([values, torch.full((2, 3), 9.0)], 1),
        torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1),
        gamma,
    )
    torch.testing.assert_close(padded[:, :4], out)


def test_i14a_library_refuses_to_backprop_a_sampled_log_ratio():
    logp = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="detached advantage"):
        losses.sampled_rkl_advantage(logp, torch.randn(2, 3), torch.ones(2, 3))


def test_is_loss_at_behaviour_policy_equals_minus_sum_advantage():
    logp = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    advantage = torch.randn(2, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    loss, metrics = losses.pg_loss(logp, logp.detach(), advantage, mask, 5.0)
    torch.testing.assert_close(loss.detach(), -(advantage * mask).sum() / 5.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, -(advantage * mask) / 5.0)
    assert metrics["is_ratio_min"] == metrics["is_ratio_max"] == 1.0


@pytest.mark.parametrize("objective", ["full_rkl", "full_fkl", "jsd", "sampled_rkl"])
def test_teacher_equal_to_student_gives_zero_loss_and_zero_gradient(objective):
    logits = torch.randn(2, 5, V, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    teacher_logp_BTV = logits.detach().log_softmax(-1)
    if objective == "sampled_rkl":
        logp = losses.token_logprobs(logits, tokens)
        teacher = losses.token_logprobs(logits.detach(), tokens)  # the teacher is the same network
        advantage, metrics = losses.sampled_rkl_advantage(logp.detach(), teacher, mask)
        assert metrics["teacher_kl"] == 0.0
        loss, _ = losses.pg_loss(logp, logp.detach(), advantage, mask, 10.0)
    else:
        beta = {"full_rkl": 1.0, "full_fkl": 0.0, "jsd": 0.3}[objective]
        loss, _ = losses.divergence_loss(logits, teacher_logp_BTV, mask, 10.0, beta=beta, temperature=1.5)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-12)
    assert logits.grad is not None and float(logits.grad.abs().max()) < 1e-12


def test_token_logprobs_match_cross_entropy():
    logits = torch.randn(3, 4, V)
    tokens = torch.randint(0, V, (3, 4))
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), tokens.reshape(-1), reduction="none")
    torch.testing.assert_close(losses.token_logprobs(logits, tokens), -ce.reshape(3, 4))


def test_normaliser_is_explicit_so_micro_batches_add_up():
    logits = torch.randn(4, 3, V)
    teacher = torch.randn(4, 3, V).log_softmax(-1)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]]).bool()
    whole, _ = losses.divergence_loss(logits, teacher, mask, float(mask.sum()), beta=1.0)
    halves = [
        losses.divergence_loss(logits[s], teacher[s], mask[s], float(mask.sum()), beta=1.0)[0]
        for s in (slice(0, 2), slice(2, 4))
    ]
    torch.testing.assert_close(whole, halves[0] + halves[1])


def test_full_reverse_kl_handles_teacher_zeros_where_student_is_zero():
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]]], requires_grad=True)
    teacher = torch.tensor([[[0.0, 0.0, float("-inf")]]]).log_softmax(-1)
    loss, _ = losses.divergence_loss(logits, teacher, torch.ones(1, 1), 1.0, beta=1.0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(logits.grad).all()


def test_cross_entropy_masks_prompt_and_padding():
    logits = torch.randn(2, 3, V)
    tokens = torch.randint(0, V, (2, 3))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    loss, _ = losses.cross_entropy(logits, tokens, mask, 3.0)
    nll = -losses.token_logprobs(logits, tokens)
    torch.testing.assert_close(loss, (nll[0, 0] + nll[0, 1] + nll[1, 0]) / 3.0)
