"""Pure objective math (ALGORITHMS.md §1-§3): tensors in, ``(loss, metrics)`` out.

Nothing here sees a model, tokenizer, config or process group. Losses are per token ([B, T]); a
``Normalizer`` built from the step's global counts turns them into one number. Masks are explicit
boolean tensors, log-softmax runs in fp32, and metrics are detached Python floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    baseline_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """OPD advantage A_t = -c_KL (log p_S(y_t) - log p_T(y_t) - b_t), optionally discounted (ALGORITHMS.md §2.3).

    The log-ratio is a per-token reward, never a loss: back-propagating it directly has zero expected
    gradient (I14a), so tensors that carry gradient are refused. Use the result in ``pg_per_token``.
    ``baseline_BT``: vOPD's control variate b_t = RKL_t, the exact per-state reverse KL (Oh et al. 2026,
    ALGORITHMS.md §10): action-independent, so the gradient stays unbiased (I4) while E_y[A_t] = 0.
    Shapes: all [B, T]; returns (advantage_BT, metrics) with ``teacher_kl`` = mean sampled reverse KL.
    """
    if baseline_BT is not None and discount > 0:
        raise ValueError("a per-state baseline is only action-independent without discounting (discount = 0)")
    if baseline_BT is not None and baseline_BT.requires_grad:
        raise ValueError("the vOPD baseline must be detached: no gradient may flow through b_t")
    if sampler_logp_BT.requires_grad or teacher_logp_BT.requires_grad:
        raise ValueError(
            "sampled_rkl_advantage got log-probs that require grad: the sampled log-ratio must be a detached "
            "advantage in the policy-gradient branch, not a loss (ALGORITHMS.md §1.4, rule 1)."
        )
    mask_BT = mask_BT.float()
    log_ratio_BT = (sampler_logp_BT - teacher_logp_BT) * mask_BT
    centred_BT = log_ratio_BT if baseline_BT is None else log_ratio_BT - baseline_BT * mask_BT
    advantage_BT = discounted_future_sum(-kl_coef * centred_BT, mask_BT, discount)
    count = mask_BT.sum().clamp(min=1)
    return advantage_BT, {"teacher_kl": float(log_ratio_BT.sum() / count)}


def pg_per_token(
    logp_BT: torch.Tensor,
    sampler_logp_BT: torch.Tensor,
    advantage_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    clip: tuple[float, float] | None = None,
    dual_clip: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token policy-gradient loss -ρ_t A_t with ρ = exp(logp - logp_sampler) (ALGORITHMS.md §1.4).

    ``clip=None``: plain importance sampling (tinker ``importance_sampling``); at logp = logp_sampler the
    gradient is -A ∇logp. ``clip=(ε_low, ε_high)``: PPO, max(-ρA, -clip(ρ, 1-ε_low, 1+ε_high)A); with
    ``dual_clip`` = c > 1 the loss of a negative-advantage token is also capped at -cA (Ye et al. 2020,
    as in verl). Returns (loss_BT, metrics); the advantage is treated as a constant.
    """
    advantage_BT = advantage_BT.detach()
    ratio_BT = torch.exp(logp_BT - sampler_logp_BT.detach())
    loss_BT = -ratio_BT * advantage_BT
    kept = mask_BT.bool()
    ratios = ratio_BT.detach()[kept] if kept.any() else torch.ones(1)
    metrics = {"is_ratio_min": float(ratios.min()), "is_ratio_max": float(ratios.max())}
    if clip is not None:
        clipped_BT = -ratio_BT.clamp(1 - clip[0], 1 + clip[1]) * advantage_BT
        clipped_active_BT = clipped_BT > loss_BT
        loss_BT = torch.maximum(loss_BT, clipped_BT)
        if dual_clip > 0:
            capped_BT = (advantage_BT < 0) & (loss_BT > -dual_clip * advantage_BT)
            loss_BT = torch.where(
                advantage_BT < 0, torch.minimum(loss_BT, -dual_clip * advantage_BT), loss_BT
            )
            clipped_active_BT = clipped_active_BT | capped_BT
        metrics["clip_frac"] = float(clipped_active_BT[kept].float().mean()) if kept.any() else 0.0
    return loss_BT, metrics


def k2_per_token(logp_BT: torch.Tensor, teacher_logp_BT: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log p_S(y_t) - log p_T(y_t))², back-propagated directly: per sample its gradient is exactly the
    PG gradient with A = -ℓ (ALGORITHMS.md §1.4 rule 2, I14b; KDRL). On-policy samples only."""
    return 0.5 * (logp_BT - teacher_logp_BT.detach()) ** 2


def kl_terms(logp_a_BTV: torch.Tensor, logp_b_BTV: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) per position = Σ_v a_v (log a_v - log b_v), with 0 log 0 = 0: where a has no mass the term
    vanishes whatever b says there (masked before the product, so neither value nor gradient sees -inf)."""
    log_ratio_BTV = (logp_a_BTV - logp_b_BTV).masked_fill(torch.isneginf(logp_a_BTV), 0.0)
    return (logp_a_BTV.exp() * log_ratio_BTV).sum(-1)


def generalized_jsd(
    student_logits_BTV: torch.Tensor, teacher_logp_BTV: torch.Tensor, beta: float, temperature: float = 1.0
) -> torch.Tensor:
    """Per-position generalized JSD between teacher q and student p over the full vocabulary (GKD, Agarwal
    et al. 2023; ALGORITHMS.md §3). JSD_β = β KL(q ‖ m) + (1-β) KL(p ‖ m), m = β q + (1-β) p, with TRL's
    endpoints: β = 0 is exactly the forward KL(q ‖ p), β = 1 exactly the reverse KL(p ‖ q).

    Both sides are divided by the loss temperature τ before the softmax; the teacher may be given as
    log-probs at τ = 1 (re-normalising logp/τ equals softmax(logits/τ)). Gradient flows into the student
    only, at fixed states (direct branch). Returns [B, T]. Materialises a few [B, T, V] fp32 temporaries.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd needs 0 <= beta <= 1, got {beta}")
    student_BTV = torch.log_softmax(at_least_fp32(student_logits_BTV) / temperature, dim=-1)
    teacher_BTV = torch.log_softmax(at_least_fp32(teacher_logp_BTV) / temperature, dim=-1)
    if beta == 0.0:
        return kl_terms(teacher_BTV, student_BTV)
    if beta == 1.0:
        return kl_terms(student_BTV, teacher_BTV)
    mixture_BTV = torch.logsumexp(
        torch.stack([student_BTV + math.log1p(-beta), teacher_BTV + math.log(beta)]), dim=0
    )
    return beta * kl_terms(teacher_BTV, mixture_BTV) + (1 - beta) * kl_terms(student_BTV, mixture_BTV)


def clip_divergence(
    divergence_BT: torch.Tensor, mask_BT: torch.Tensor, limit: float, soft: bool = False
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token clipped divergence (OPSD launchers, Open-OPD; ALGORITHMS.md §6.2): min(D_t, c), so a few
    high-divergence tokens cannot dominate the gradient; clipped tokens get zero gradient. ``soft``: the [D]
    variant c·tanh(D/c), bounded by c but with gradient everywhere. Logs ``token_clip_frac`` = share of
    masked tokens with D_t > c."""
    clipped_BT = limit * torch.tanh(divergence_BT / limit) if soft else divergence_BT.clamp(max=limit)
    over = divergence_BT.detach()[mask_BT.bool()] > limit
    return clipped_BT, {"token_clip_frac": float(over.float().mean()) if over.numel() else 0.0}


@dataclass(frozen=True)
class Normalizer:
    """How a step's per-token losses become one number (ALGORITHMS.md §1.5), from the step's global counts
    (all micro-batches, all ranks), so micro-batching and world size never change the gradient.

    token-mean: Σ m x / tokens · seq-mean-token-mean: Σ_b (Σ_t m x / Σ_t m) / sequences ·
    seq-mean-token-sum: Σ m x / sequences · sum: Σ m x · constant: Σ m x / constant (Dr. GRPO style).
    """

    mode: str
    tokens: float
    sequences: float
    constant: float = 1.0

    def __call__(self, per_token_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
        mask_BT = mask_BT.to(per_token_BT.dtype)
        # where() rather than a product: a masked position may hold inf/nan (e.g. a -inf log-prob on padding)
        masked_BT = torch.where(mask_BT > 0, per_token_BT, torch.zeros_like(per_token_BT))
        if self.mode == "token-mean":
            return masked_BT.sum() / max(self.tokens, 1.0)
        if self.mode == "seq-mean-token-mean":
            return (masked_BT.sum(1) / mask_BT.sum(1).clamp(min=1)).sum() / max(self.sequences, 1.0)
        if self.mode == "seq-mean-token-sum":
            return masked_BT.sum() / max(self.sequences, 1.0)
        if self.mode == "sum":
            return masked_BT.sum()
        if self.mode == "constant":
            return masked_BT.sum() / self.constant
        raise ValueError(f"unknown aggregation {self.mode!r}")


def masked_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    """Mean of ``values`` over masked positions, as a detached float (for metrics)."""
    mask_BT = mask_BT.bool()
    return float(values_BT.detach()[mask_BT].mean()) if mask_BT.any() else 0.0
