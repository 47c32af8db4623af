"""Pure objective math (ALGORITHMS.md §1-§3): tensors in, ``(loss, metrics)`` out.

Nothing here sees a model, tokenizer, config or process group. Masks are explicit boolean tensors,
normalisers are passed in (the global count of loss tokens across micro-batches and ranks), log-softmax
runs in fp32, and metrics are detached Python floats.
"""

from __future__ import annotations

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 to fp32 for log-softmax and reductions; fp32 and fp64 pass through."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_logprobs(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] in fp32 without materialising the [B, T, V] log-softmax."""
    logits_BTV = at_least_fp32(logits_BTV)
    picked_BT = logits_BTV.gather(-1, tokens_BT.unsqueeze(-1)).squeeze(-1)
    return picked_BT - torch.logsumexp(logits_BTV, dim=-1)


def discounted_future_sum(values_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """A_t = v_t + γ A_{t+1} along each row, with A = 0 on masked positions so sums reset at padding
    (tinker-cookbook ``discounted_future_sum_vectorized``; ALGORITHMS.md I10). γ = 0 is the identity."""
    values_BT = values_BT * mask_BT
    if gamma == 0:
        return values_BT
    out_BT = torch.zeros_like(values_BT)
    running_B = torch.zeros_like(values_BT[:, 0])
    for t in range(values_BT.shape[1] - 1, -1, -1):
        running_B = (values_BT[:, t] + gamma * running_B) * mask_BT[:, t]
        out_BT[:, t] = running_B
    return out_BT


def sampled_rkl_advantage(
    sampler_logp_BT: torch.Tensor,
    teacher_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    kl_coef: float = 1.0,
    discount: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """OPD advantage A_t = -c_KL (log p_S(y_t) - log p_T(y_t)), optionally discounted (ALGORITHMS.md §2.3).

    The log-ratio is a per-token reward, never a loss: back-propagating it directly has zero expected
    gradient (I14a), so tensors that carry gradient are refused. Use the result in ``pg_loss``.
    Shapes: all [B, T]; returns (advantage_BT, metrics) with ``teacher_kl`` = mean sampled reverse KL.
    """
    if sampler_logp_BT.requires_grad or teacher_logp_BT.requires_grad:
        raise ValueError(
            "sampled_rkl_advantage got log-probs that require grad: the sampled log-ratio must be a detached "
            "advantage in the policy-gradient branch, not a loss (ALGORITHMS.md §1.4, rule 1)."
        )
    mask_BT = mask_BT.float()
    log_ratio_BT = (sampler_logp_BT - teacher_logp_BT) * mask_BT
    advantage_BT = discounted_future_sum(-kl_coef * log_ratio_BT, mask_BT, discount)
    count = mask_BT.sum().clamp(min=1)
    return advantage_BT, {"teacher_kl": float(log_ratio_BT.sum() / count)}


def pg_loss(
    logp_BT: torch.Tensor,
    sampler_logp_BT: torch.Tensor,
    advantage_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    normalizer: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Importance-sampled policy gradient: -(1/Z) Σ m ρ A with ρ = exp(logp - logp_sampler) (tinker
    ``importance_sampling``; ALGORITHMS.md §1.4). At logp = logp_sampler the gradient is -(1/Z) Σ m A ∇logp."""
    mask_BT = mask_BT.float()
    ratio_BT = torch.exp(logp_BT - sampler_logp_BT.detach())
    loss = -(ratio_BT * advantage_BT.detach() * mask_BT).sum() / normalizer
    kept = mask_BT.bool()
    ratios = ratio_BT.detach()[kept] if kept.any() else torch.ones(1)
    return loss, {"is_ratio_min": float(ratios.min()), "is_ratio_max": float(ratios.max())}


def reverse_kl_full(
    student_logits_BTV: torch.Tensor,
    teacher_logp_BTV: torch.Tensor,
    mask_BT: torch.Tensor,
    normalizer: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(1/Z) Σ m_t KL(p_S(·|s_t) ‖ p_T(·|s_t)) over the full vocabulary at each visited state: the direct
    branch, GKD with β = 1 (ALGORITHMS.md §3; gradient I2). No gradient flows through the sampling."""
    student_logp_BTV = torch.log_softmax(at_least_fp32(student_logits_BTV), dim=-1)
    # 0 log 0 = 0: where the student has no mass the term vanishes, whatever the teacher says there
    # (masked before the product so that neither the value nor the gradient sees -inf - -inf)
    impossible_BTV = torch.isneginf(student_logp_BTV)
    log_ratio_BTV = (student_logp_BTV - at_least_fp32(teacher_logp_BTV)).masked_fill(impossible_BTV, 0.0)
    per_token_BT = (student_logp_BTV.exp() * log_ratio_BTV).sum(-1)
    mask_BT = mask_BT.float()
    loss = (per_token_BT * mask_BT).sum() / normalizer
    return loss, {"full_rkl": float((per_token_BT.detach() * mask_BT).sum() / mask_BT.sum().clamp(min=1))}


def cross_entropy(
    logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, mask_BT: torch.Tensor, normalizer: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """SFT: (1/Z) Σ m_t -log p(y_t) on completion tokens (prompt and padding masked out)."""
    mask_BT = mask_BT.float()
    nll_BT = -token_logprobs(logits_BTV, tokens_BT)
    loss = (nll_BT * mask_BT).sum() / normalizer
    return loss, {"nll": float((nll_BT.detach() * mask_BT).sum() / mask_BT.sum().clamp(min=1))}
