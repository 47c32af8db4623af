"""Top-K reverse KL variants (math.md §5) against the closed forms I5a-c, I13, I16a-c, and chunking."""

from __future__ import annotations

import pytest
import torch

from opdistill.config import load_config
from opdistill.objectives import losses

V = 9
VARIANTS = ("raw", "sg", "renorm", "tail", "pg")


def _state(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g, dtype=torch.float64), torch.randn(V, generator=g, dtype=torch.float64)


def _value_and_grad(z, ids, teacher_logp, variant, valid=None):
    """Loss and d loss / d z at one position, for support ``ids`` with the teacher's log-probs there."""
    z = z.clone().requires_grad_(True)
    ids_BTK = torch.tensor(ids)[None, None]
    valid_BTK = None if valid is None else torch.tensor(valid)[None, None]
    loss = losses.topk_divergence(z[None, None], ids_BTK, teacher_logp[ids_BTK], variant, valid_BTK)[0, 0]
    loss.backward()
    assert z.grad is not None
    return loss.detach(), z.grad


def _full_rkl(z, teacher_logp):
    p, ell = z.softmax(-1), z.log_softmax(-1) - teacher_logp
    kl = (p * ell).sum()
    return kl, p * (ell - kl)


def test_i5a_stop_grad_top_k_is_the_exact_gradient_restricted_to_the_support():
    z, t = _state(0)
    q, support = t.log_softmax(-1), [4, 0, 7]
    _, grad = _value_and_grad(z, support, q, "sg")
    p, ell = z.softmax(-1), z.log_softmax(-1) - q
    in_s = torch.zeros(V, dtype=torch.float64)
    in_s[support] = 1
    torch.testing.assert_close(grad, in_s * p * ell - p * (in_s * p * ell).sum())


def test_i5b_raw_top_k_adds_the_mass_leak_gradient():
    z, t = _state(1)
    q, support = t.log_softmax(-1), [2, 3, 8]
    _, raw = _value_and_grad(z, support, q, "raw")
    _, sg = _value_and_grad(z, support, q, "sg")
    p = z.softmax(-1)
    in_s = torch.zeros(V, dtype=torch.float64)
    in_s[support] = 1
    mass_grad = p * (in_s - (in_s * p).sum())  # ∂m_S/∂z_j = p_j (1[j∈S] - m_S)
    torch.testing.assert_close(raw, sg + mass_grad)
    assert not torch.allclose(raw, sg)


@pytest.mark.parametrize("variant", VARIANTS)
def test_i5c_i13_every_variant_is_the_full_reverse_kl_when_the_support_is_the_vocabulary(variant):
    z, t = _state(2)
    q = t.log_softmax(-1)
    value, grad = _value_and_grad(z, torch.randperm(V).tolist(), q, variant)
    kl, kl_grad = _full_rkl(z, q)
    torch.testing.assert_close(value, kl)
    torch.testing.assert_close(grad, kl_grad)


def test_i16a_renormalised_top_k_gradient_has_no_mass_leak_term():
    z, t = _state(3)
    q, support = t.log_softmax(-1), [1, 5, 6, 2]
    value, grad = _value_and_grad(z, support, q, "renorm")
    s_hat = z[support].log_softmax(-1)
    ell_hat = s_hat - q[support].log_softmax(-1)
    kl_hat = (s_hat.exp() * ell_hat).sum()
    expected = torch.zeros(V, dtype=torch.float64)
    expected[support] = s_hat.exp() * (ell_hat - kl_hat)
    torch.testing.assert_close(value, kl_hat)
    torch.testing.assert_close(grad, expected)


def test_i16b_c_tail_bucket_is_a_lower_bound_exact_at_k_equals_v_minus_1():
    for seed in range(5):
        z, t = _state(10 + seed)
        q = t.log_softmax(-1)
        kl, _ = _full_rkl(z, q)
        for k in range(1, V - 1):
            value, _ = _value_and_grad(z, list(range(k)), q, "tail")
            assert value <= kl + 1e-12
        value, _ = _value_and_grad(z, list(range(V - 1)), q, "tail")
        torch.testing.assert_close(value, kl)


def test_top_k_forward_kl_is_the_teacher_weighted_term_on_the_support():
    z, t = _state(4)
    q, support = t.log_softmax(-1), [0, 3]
    value, grad = _value_and_grad(z, support, q, "fkl")
    logp = z.log_softmax(-1)
    torch.testing.assert_close(value, (q[support].exp() * (q[support] - logp[support])).sum())
    # -Σ_S q_v ∇ log p_v = -(q on S) + (Σ_S q) p
    expected = z.softmax(-1) * q[support].exp().sum()
    expected[support] -= q[support].exp()
    torch.testing.assert_close(grad, expected)
    full_value, _ = _value_and_grad(z, list(range(V)), q, "fkl")
    torch.testing.assert_close(full_value, (q.exp() * (q - logp)).sum())


@pytest.mark.parametrize("variant", (*VARIANTS, "fkl"))
def test_teacher_equal_to_student_gives_zero_loss_and_zero_gradient_except_unnormalised_ones(variant):
    z, _ = _state(5)
    support = [6, 1, 2]
    value, grad = _value_and_grad(z, support, z.log_softmax(-1), variant)
    torch.testing.assert_close(value, torch.tensor(0.0, dtype=torch.float64))
    p = z.softmax(-1)
    mass_grad = -p * p[support].sum()
    mass_grad[support] += p[support]  # ∇m_S
    # T1's bias: even a perfect student is pushed out of S along ∇m_S (I5b); the un-renormalised forward
    # KL (EOPD's term) pulls it the other way, into S
    expected = {"raw": mass_grad, "fkl": -mass_grad}.get(variant, torch.zeros(V, dtype=torch.float64))
    torch.testing.assert_close(grad, expected)


def test_invalid_slots_are_ignored_so_union_and_intersection_are_the_sets_they_name():
    z, t = _state(6)
    q = t.log_softmax(-1)
    # union of teacher {1, 2, 3} and student {3, 4, 5}: the duplicate 3 counts once
    teacher = (torch.tensor([1, 2, 3])[None, None], q[[1, 2, 3]][None, None])
    student = (torch.tensor([3, 4, 5])[None, None], q[[3, 4, 5]][None, None])
    ids, logp, valid = losses.topk_support("union", teacher, student)
    assert valid.tolist() == [[[True, True, True, False, True, True]]]
    for variant in VARIANTS:
        union, union_grad = _value_and_grad(z, ids[0, 0].tolist(), q, variant, valid[0, 0].tolist())
        plain, plain_grad = _value_and_grad(z, [1, 2, 3, 4, 5], q, variant)
        torch.testing.assert_close((union, union_grad), (plain, plain_grad))
    # intersection (T5): the teacher's ids that the student's top-K also holds
    ids, _, valid = losses.topk_support("intersect", teacher, student_ids_BTK=torch.tensor([[[5, 3, 1]]]))
    assert valid.tolist() == [[[True, False, True]]]
    both, both_grad = _value_and_grad(z, [1, 2, 3], q, "renorm", [True, False, True])
    plain, plain_grad = _value_and_grad(z, [1, 3], q, "renorm")
    torch.testing.assert_close((both, both_grad), (plain, plain_grad))
    empty, empty_grad = _value_and_grad(z, [1, 2, 3], q, "renorm", [False, False, False])
    assert float(empty) == 0.0 and not empty_grad.any() and torch.isfinite(empty_grad).all()


def test_k1_renormalised_is_identically_zero_and_the_config_warns():
    z, t = _state(7)
    value, grad = _value_and_grad(z, [3], t.log_softmax(-1), "renorm")
    assert float(value) == 0.0 and not grad.any()
    with pytest.warns(UserWarning, match="identically 0"):
        load_config(None, ["objective.type=topk_rkl", "objective.topk=1", "objective.topk_variant=renorm"])


def test_a_support_without_its_teacher_signal_is_an_error():
    with pytest.raises(ValueError, match="needs the teacher's top-K"):
        losses.topk_support("teacher", at_student_ids=(torch.zeros(1, 1, 2).long(), torch.zeros(1, 1, 2)))


@pytest.mark.parametrize("which", ["jsd", "topk", "token_logprobs"])
def test_chunking_over_positions_changes_neither_value_nor_gradient(which):
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 11, V, generator=g, dtype=torch.float64)
    teacher = torch.randn(3, 11, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(V, (3, 11), generator=g)
    weights = torch.rand(3, 11, generator=g, dtype=torch.float64)
    top = teacher.log_softmax(-1).topk(4, dim=-1)

    def run(chunk_elements):
        z = logits.clone().requires_grad_(True)
        if which == "jsd":
            out = losses.generalized_jsd(z, teacher, 0.3, 2.0, chunk_elements=chunk_elements)
        elif which == "topk":
            out = losses.topk_divergence(z, top.indices, top.values, "sg", chunk_elements=chunk_elements)
        else:
            out = losses.token_logprobs(z, tokens, chunk_elements=chunk_elements)
        (out * weights).sum().backward()
        return out.detach(), z.grad

    whole, whole_grad = run(losses.CHUNK_ELEMENTS)
    for chunk_elements in (3 * V, 4 * 3 * V):  # one position per chunk; chunks of 4 with a short last one
        part, part_grad = run(chunk_elements)
        torch.testing.assert_close(part, whole)
        torch.testing.assert_close(part_grad, whole_grad)
