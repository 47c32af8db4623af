"""The math core against the closed forms of math.md §15 (I1-I3, I10, I14a,b) and its properties."""

from __future__ import annotations

import pytest
import torch

from opdistill.objectives import losses

V = 7
SUM = losses.Normalizer("sum", 0, 0)


def _dist(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g, dtype=torch.float64), torch.randn(V, generator=g, dtype=torch.float64)


def test_i1_sampled_log_ratio_is_unbiased_for_reverse_kl():
    z, t = _dist(0)
    p, logp, logq = z.softmax(-1), z.log_softmax(-1), t.log_softmax(-1)
    # lay the V possible samples y side by side as positions; the advantage at each is -ℓ_y
    advantage, _ = losses.sampled_rkl_advantage(logp[None], logq[None], torch.ones(1, V, dtype=torch.bool))
    torch.testing.assert_close(-(p * advantage[0]).sum(), (p * (logp - logq)).sum())


def test_i2_full_reverse_kl_value_and_gradient():
    z, t = _dist(1)
    z.requires_grad_(True)
    teacher_logp = t.log_softmax(-1)
    loss = SUM(losses.generalized_jsd(z[None, None], teacher_logp[None, None], beta=1.0), torch.ones(1, 1))
    loss.backward()
    p, ell = z.detach().softmax(-1), z.detach().log_softmax(-1) - teacher_logp
    kl = (p * ell).sum()
    torch.testing.assert_close(loss.detach(), kl)
    torch.testing.assert_close(z.grad, p * (ell - kl))


def _expected_gradient(z, teacher_logp, per_sample_loss):
    """E_{y~p}[∇_z loss(y)], enumerating the V possible samples."""
    p = z.softmax(-1)
    total = torch.zeros(V, dtype=torch.float64)
    for y in range(V):
        zy = z.clone().requires_grad_(True)
        logp_BT = zy.log_softmax(-1)[y].reshape(1, 1)
        per_sample_loss(logp_BT, teacher_logp[y].reshape(1, 1)).backward()
        total += p[y] * zy.grad
    return total


def _rkl_gradient(z, teacher_logp):
    p = z.softmax(-1)
    ell = z.log_softmax(-1) - teacher_logp
    return p * (ell - (p * ell).sum())


def test_i3_detached_advantage_pg_is_exact_in_expectation():
    z, t = _dist(2)
    teacher_logp = t.log_softmax(-1)

    def pg(logp_BT, teacher_BT):
        advantage, _ = losses.sampled_rkl_advantage(logp_BT.detach(), teacher_BT, torch.ones(1, 1))
        return SUM(
            losses.pg_per_token(logp_BT, logp_BT.detach(), advantage, torch.ones(1, 1))[0], torch.ones(1, 1)
        )

    torch.testing.assert_close(_expected_gradient(z, teacher_logp, pg), _rkl_gradient(z, teacher_logp))


def test_i4_vopd_advantage_has_zero_mean_and_the_same_expected_gradient():
    z, t = _dist(4)
    teacher_logp = t.log_softmax(-1)
    p, logp = z.softmax(-1), z.log_softmax(-1)
    rkl = (p * (logp - teacher_logp)).sum()
    baseline = rkl.expand(1, V)
    advantage, _ = losses.sampled_rkl_advantage(
        logp[None], teacher_logp[None], torch.ones(1, V), baseline_BT=baseline
    )
    assert float((p * advantage[0]).sum()) == pytest.approx(0.0, abs=1e-12)  # E_y[A] = 0 at the state

    def vopd(logp_BT, teacher_BT):
        advantage, _ = losses.sampled_rkl_advantage(
            logp_BT.detach(), teacher_BT, torch.ones(1, 1), baseline_BT=rkl.detach().reshape(1, 1)
        )
        return SUM(
            losses.pg_per_token(logp_BT, logp_BT.detach(), advantage, torch.ones(1, 1))[0], torch.ones(1, 1)
        )

    torch.testing.assert_close(_expected_gradient(z, teacher_logp, vopd), _rkl_gradient(z, teacher_logp))


def test_vopd_baseline_refuses_gradient_and_discounting():
    logp, teacher, mask = torch.randn(1, 3), torch.randn(1, 3), torch.ones(1, 3)
    with pytest.raises(ValueError, match="must be detached"):
        losses.sampled_rkl_advantage(logp, teacher, mask, baseline_BT=torch.zeros(1, 3, requires_grad=True))
    with pytest.raises(ValueError, match="without discounting"):
        losses.sampled_rkl_advantage(logp, teacher, mask, discount=0.9, baseline_BT=torch.zeros(1, 3))


def test_i14b_k2_has_the_pg_gradient_per_sample_and_rkl_in_expectation():
    z, t = _dist(3)
    teacher_logp = t.log_softmax(-1)
    for y in range(V):
        grads = []
        for use_k2 in (True, False):
            zy = z.clone().requires_grad_(True)
            logp_BT = zy.log_softmax(-1)[y].reshape(1, 1)
            if use_k2:
                loss_BT = losses.k2_per_token(logp_BT, teacher_logp[y].reshape(1, 1))
            else:
                advantage, _ = losses.sampled_rkl_advantage(
                    logp_BT.detach(), teacher_logp[y].reshape(1, 1), torch.ones(1, 1)
                )
                loss_BT, _ = losses.pg_per_token(logp_BT, logp_BT.detach(), advantage, torch.ones(1, 1))
            loss_BT.sum().backward()
            grads.append(zy.grad)
        torch.testing.assert_close(grads[0], grads[1])
    k2 = _expected_gradient(z, teacher_logp, lambda lp, tp: losses.k2_per_token(lp, tp).sum())
    torch.testing.assert_close(k2, _rkl_gradient(z, teacher_logp))


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


@pytest.mark.parametrize("clip", [None, (0.2, 0.2), (0.1, 0.3)])
def test_is_loss_at_behaviour_policy_equals_minus_advantage(clip):
    logp = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    advantage = torch.randn(2, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    loss_BT, metrics = losses.pg_per_token(
        logp, logp.detach(), advantage, mask, clip, dual_clip=3.0 if clip else 0.0
    )
    loss = losses.Normalizer("constant", 0, 0, 5.0)(loss_BT, mask)
    torch.testing.assert_close(loss.detach(), -(advantage * mask).sum() / 5.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, -(advantage * mask) / 5.0)
    assert metrics["is_ratio_min"] == metrics["is_ratio_max"] == 1.0
    assert metrics.get("clip_frac", 0.0) == 0.0


def test_ppo_clip_and_dual_clip():
    sampler = torch.zeros(1, 4, dtype=torch.float64)
    # ratios 1.5, 0.5, 1.5, 10 with advantages +1, -1, -1, -1
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.5, 10.0]], dtype=torch.float64)).requires_grad_(True)
    advantage = torch.tensor([[1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss_BT, metrics = losses.pg_per_token(logp, sampler, advantage, mask, (0.2, 0.2), dual_clip=3.0)
    # +A, ρ above 1+ε: clipped at -1.2 (no gradient); -A, ρ below 1-ε: clipped at 0.8 (no gradient);
    # -A, ρ = 1.5: unclipped 1.5; -A, ρ = 10: dual clip caps the loss at 3 (no gradient)
    torch.testing.assert_close(loss_BT.detach(), torch.tensor([[-1.2, 0.8, 1.5, 3.0]], dtype=torch.float64))
    loss_BT.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 1.5, 0.0]], dtype=torch.float64))
    assert metrics["clip_frac"] == pytest.approx(0.75)


@pytest.mark.parametrize("objective", ["full_rkl", "full_fkl", "jsd", "sampled_rkl", "k2"])
def test_teacher_equal_to_student_gives_zero_loss_and_zero_gradient(objective):
    logits = torch.randn(2, 5, V, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    logp = losses.token_logprobs(logits, tokens)
    teacher = losses.token_logprobs(logits.detach(), tokens)  # the teacher is the same network
    if objective == "sampled_rkl":
        advantage, metrics = losses.sampled_rkl_advantage(logp.detach(), teacher, mask)
        assert metrics["teacher_kl"] == 0.0
        loss_BT, _ = losses.pg_per_token(logp, logp.detach(), advantage, mask, (0.2, 0.2), 3.0)
    elif objective == "k2":
        loss_BT = losses.k2_per_token(logp, teacher)
    else:
        beta = {"full_rkl": 1.0, "full_fkl": 0.0, "jsd": 0.3}[objective]
        loss_BT = losses.generalized_jsd(logits, logits.detach().log_softmax(-1), beta=beta, temperature=1.5)
    loss = losses.Normalizer("token-mean", 10, 2)(loss_BT, mask)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-12)
    assert logits.grad is not None and float(logits.grad.abs().max()) < 1e-12


def test_token_logprobs_match_cross_entropy():
    logits = torch.randn(3, 4, V)
    tokens = torch.randint(0, V, (3, 4))
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), tokens.reshape(-1), reduction="none")
    torch.testing.assert_close(losses.token_logprobs(logits, tokens), -ce.reshape(3, 4))


def test_aggregations_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    expected = {
        "token-mean": (1 + 2 + 4) / 3,
        "seq-mean-token-mean": ((1 + 2) / 2 + 4 / 1) / 2,
        "seq-mean-token-sum": (1 + 2 + 4) / 2,
        "sum": 7.0,
        "constant": 7.0 / 4.0,
    }
    for mode, value in expected.items():
        got = losses.Normalizer(mode, tokens=3, sequences=2, constant=4.0)(values, mask)
        assert float(got) == pytest.approx(value), mode


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "sum", "constant"]
)
def test_micro_batches_add_up_to_the_whole_step(mode):
    values = torch.randn(4, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]]).bool()
    normalizer = losses.Normalizer(mode, tokens=float(mask.sum()), sequences=4, constant=3.0)
    halves = normalizer(values[:2], mask[:2]) + normalizer(values[2:], mask[2:])
    torch.testing.assert_close(normalizer(values, mask), halves)


def test_masked_positions_never_leak_inf_or_nan():
    values = torch.tensor([[1.0, float("inf"), float("nan")]])
    mask = torch.tensor([[1, 0, 0]]).bool()
    assert float(losses.Normalizer("sum", 0, 0)(values, mask)) == 1.0


def test_full_reverse_kl_handles_teacher_zeros_where_student_is_zero():
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]]], requires_grad=True)
    teacher = torch.tensor([[[0.0, 0.0, float("-inf")]]]).log_softmax(-1)
    loss = SUM(losses.generalized_jsd(logits, teacher, beta=1.0), torch.ones(1, 1))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("soft", [False, True])
def test_token_clip(soft):
    divergence = torch.tensor([[0.01, 0.05, 0.5, 2.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]]).bool()
    clipped, metrics = losses.clip_divergence(divergence, mask, 0.1, soft=soft)
    clipped.sum().backward()
    assert divergence.grad is not None
    assert metrics["token_clip_frac"] == pytest.approx(1 / 3)  # only masked tokens count
    if soft:  # bounded by c, with a gradient everywhere, and close to D where D << c
        assert bool((clipped <= 0.1).all()) and bool((divergence.grad[0, :3] > 0).all())
        assert float(clipped.detach()[0, 0]) == pytest.approx(0.01, rel=1e-2)
    else:  # D <= c unchanged (gradient 1), D > c clamped (gradient 0)
        torch.testing.assert_close(
            clipped.detach(), torch.tensor([[0.01, 0.05, 0.1, 0.1]], dtype=torch.float64)
        )
        torch.testing.assert_close(divergence.grad, torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64))
