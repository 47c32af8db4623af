"""Pure objective math (math.md §1-§5, §8.1, §10): tensors in, ``(loss, metrics)`` out.

Nothing here sees a model, tokenizer, config or process group. Losses are per token ([B, T]); a
``Normalizer`` built from the step's global counts turns them into one number. Masks are explicit
boolean tensors, log-softmax runs in fp32, and metrics are detached Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch.autograd.function import once_differentiable

# Positions per chunk are chosen so a [B, chunk, V] fp32 temporary holds about this many elements (40 MiB):
# at V = 151,936 and B = 1 that is 69 positions, so no [B, T, V] temporary is ever built (the speed rule:
# no [B, T, V] copies kept alive).
# Above glibc's 32 MiB cap on its dynamic mmap threshold, each temporary is mmapped and handed back on free;
# at 32 MiB or less, freed chunk temporaries pile up in the heap (benchmarks/loss_memory.py measured 2.3 GB).
CHUNK_ELEMENTS = 10 << 20
TAIL_FLOOR = 1e-12  # [D] tail mass floor: keeps log(tail) finite when K covers (numerically) all the mass
MASKED = -1e30  # log-prob given to ids outside a support: exp() is 0, yet sums and gradients stay finite
TopKVariant = Literal["raw", "sg", "renorm", "tail", "pg", "fkl"]


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 to fp32 for log-softmax and reductions; fp32 and fp64 pass through."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _PositionChunks(torch.autograd.Function):
    """Autograd for ``per_position``: the forward keeps no graph; the backward recomputes one chunk at a time
    and writes its gradient into the logits' gradient, so only one chunk's temporaries are ever alive."""

    @staticmethod
    def forward(ctx, fn, chunk, logits_BTV, *aux):
        # aux are constants (possibly inference-mode teacher tensors, which save_for_backward refuses)
        ctx.fn, ctx.chunk, ctx.aux = fn, chunk, aux
        ctx.save_for_backward(logits_BTV)
        return _chunked(fn, chunk, logits_BTV, aux)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        (logits_BTV,), aux = ctx.saved_tensors, ctx.aux
        grad_BTV = torch.zeros_like(logits_BTV)
        for start in range(0, logits_BTV.shape[1], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            piece = logits_BTV[:, part].detach().requires_grad_(True)
            with torch.enable_grad():
                out = ctx.fn(piece, *(a[:, part] for a in aux))
            if out.requires_grad:
                grad_BTV[:, part] = torch.autograd.grad(out, piece, grads[0][:, part])[0]
        return None, None, grad_BTV, *(None for _ in aux)


def _chunked(fn, chunk: int, logits_BTV: torch.Tensor, aux) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [
                fn(logits_BTV[:, start : start + chunk], *(a[:, start : start + chunk] for a in aux))
                for start in range(0, logits_BTV.shape[1], chunk)
            ],
            dim=1,
        )


def per_position(
    fn: Callable[..., torch.Tensor],
    logits_BTV: torch.Tensor,
    *aux: torch.Tensor,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """``fn(logits[:, chunk], *aux[:, chunk]) -> [B, chunk]`` over chunks of positions, joined to [B, T].

    Value and gradient equal those of ``fn`` on the whole tensor (each position's result depends on that
    position only), but the [B, chunk, V] temporaries of one chunk are all that is ever alive: the gradient
    is recomputed chunk by chunk in the backward (log-softmax over V in chunks over T). Gradient
    flows into ``logits_BTV`` only; ``aux`` tensors (teacher logits, ids, masks) are constants.
    """
    if any(a.requires_grad for a in aux):
        raise ValueError("per_position differentiates the logits only: detach the auxiliary tensors")
    batch, positions, vocab = logits_BTV.shape
    chunk = max(1, chunk_elements // max(1, batch * vocab))
    if chunk >= positions:
        return fn(logits_BTV, *aux)
    if not (torch.is_grad_enabled() and logits_BTV.requires_grad):
        return _chunked(fn, chunk, logits_BTV, aux)
    return _PositionChunks.apply(fn, chunk, logits_BTV, *aux)  # type: ignore[no-untyped-call]


def _token_logprobs(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
    logits_BTV = at_least_fp32(logits_BTV)
    picked_BT = logits_BTV.gather(-1, tokens_BT.unsqueeze(-1)).squeeze(-1)
    return picked_BT - torch.logsumexp(logits_BTV, dim=-1)


def token_logprobs(
    logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS
) -> torch.Tensor:
    """log softmax(logits)[token] in fp32 without materialising the [B, T, V] log-softmax."""
    return per_position(_token_logprobs, logits_BTV, tokens_BT, chunk_elements=chunk_elements)


def topk_logprobs(logits_BTV: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K most likely ids per position and their log-probs (fp32), most likely first: [B, T, K] each."""
    values_BTK, ids_BTK = logits_BTV.topk(k, dim=-1)
    lse_BT1 = per_position(lambda x: torch.logsumexp(at_least_fp32(x), -1), logits_BTV)[..., None]
    return ids_BTK, at_least_fp32(values_BTK) - lse_BT1


def logprobs_at(logits_BTV: torch.Tensor, ids_BTK: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) at the given ids (math.md §1.3, L1s): [B, T, K] fp32."""
    lse_BT1 = per_position(lambda x: torch.logsumexp(at_least_fp32(x), -1), logits_BTV)[..., None]
    return at_least_fp32(logits_BTV.gather(-1, ids_BTK)) - lse_BT1


def discounted_future_sum(values_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """A_t = v_t + γ A_{t+1} along each row, with A = 0 on masked positions so sums reset at padding
    (tinker-cookbook ``discounted_future_sum_vectorized``; docs/math.md I10). γ = 0 is the identity."""
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
    """OPD advantage A_t = -c_KL (log p_S(y_t) - log p_T(y_t) - b_t), optionally discounted (math.md §2.3).

    The log-ratio is a per-token reward, never a loss: back-propagating it directly has zero expected
    gradient (I14a), so tensors that carry gradient are refused. Use the result in ``pg_per_token``.
    ``baseline_BT``: vOPD's control variate b_t = RKL_t, the exact per-state reverse KL (Oh et al. 2026,
    math.md §10): action-independent, so the gradient stays unbiased (I4) while E_y[A_t] = 0.
    Shapes: all [B, T]; returns (advantage_BT, metrics) with ``teacher_kl`` = mean sampled reverse KL.
    """
    if baseline_BT is not None and discount > 0:
        raise ValueError("a per-state baseline is only action-independent without discounting (discount = 0)")
    if baseline_BT is not None and baseline_BT.requires_grad:
        raise ValueError("the vOPD baseline must be detached: no gradient may flow through b_t")
    if sampler_logp_BT.requires_grad or teacher_logp_BT.requires_grad:
        raise ValueError(
            "sampled_rkl_advantage got log-probs that require grad: the sampled log-ratio must be a detached "
            "advantage in the policy-gradient branch, not a loss (math.md §1.4, rule 1)."
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
    """Per-token policy-gradient loss -ρ_t A_t with ρ = exp(logp - logp_sampler) (math.md §1.4).

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
    PG gradient with A = -ℓ (math.md §1.4 rule 2, I14b; KDRL). On-policy samples only."""
    return 0.5 * (logp_BT - teacher_logp_BT.detach()) ** 2


def k3_per_token(logp_BT: torch.Tensor, reference_logp_BT: torch.Tensor) -> torch.Tensor:
    """k3 = e^{-ℓ} - 1 + ℓ with ℓ = log p_θ(y_t) - log p_ref(y_t), back-propagated directly: the sampled KL
    penalty of GRPO implementations, used by StableOPD toward the initial student (math.md §8.1). Its
    expected gradient is that of the forward KL(p_ref ‖ p_θ) (I14c), a regulariser, not an OPD objective."""
    log_ratio_BT = logp_BT - reference_logp_BT.detach()
    return torch.exp(-log_ratio_BT) - 1 + log_ratio_BT


def dpo_terms(
    delta_B: torch.Tensor, best_B: torch.Tensor, worst_B: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO on the pairs (best, worst) of each group (math.md §17): ``delta_B`` = Σ_t [log π_θ(y_t) - log
    π_ref(y_t)] of each row, z = β (Δ_best - Δ_worst) per pair, loss = -log σ(z) = softplus(-z). Returns
    (loss_N, coef_B): one loss per pair, in group order, and ∂loss/∂Δ of each row (-β σ(-z) on the best row,
    +β σ(-z) on the worst, 0 elsewhere), so Σ_t coef_B · log π_θ(y_t) has DPO's exact gradient when coef is
    detached. A group without a pair (best = worst) has no loss and coefficients 0."""
    paired_B = best_B & ~worst_B
    best_N = best_B.nonzero().squeeze(-1)
    worst_N = worst_B.nonzero().squeeze(-1)
    delta_B = at_least_fp32(delta_B)
    z_N = beta * (delta_B[best_N] - delta_B[worst_N])
    pair_N = paired_B[best_N]
    loss_N = torch.nn.functional.softplus(-z_N)[pair_N]
    slope_N = beta * torch.sigmoid(-z_N) * pair_N
    coef_B = torch.zeros_like(delta_B)
    coef_B[best_N] -= slope_N
    coef_B[worst_N] += slope_N
    return loss_N, coef_B


def minillm_long_advantage(
    sampler_logp_BT: torch.Tensor,
    teacher_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    gamma: float,
    baseline: float | None = None,
) -> torch.Tensor:
    """MiniLLM's long-term advantage (Gu et al. 2023; math.md §4): the length-normalised discounted
    future reward R^norm_{t+1} = (1/(L-t-1)) Σ_{t'>t} γ^{t'-t-1} r_{t'}, r = -(log p_S - log p_T), with L
    the row's length; 0 at the last token. The current token's own term is the single-step full reverse KL,
    so together they are MiniLLM's gradient without teacher-mixed sampling. [D] Minus a constant baseline
    (the gradient stays unbiased), by default the mean over ``mask``; the loop passes the whole step's mean
    so micro-batching does not change it. Not whitened: LMOps whitens, yet dividing a dense reward by its
    spread changes its meaning, and uncentred it is an offset of about -KL on every token whose variance
    drowns the single-step term. Detached; [B, T] → [B, T]."""
    mask_BT = mask_BT.float()
    reward_BT = -(sampler_logp_BT.detach() - teacher_logp_BT.detach()) * mask_BT
    future_BT = discounted_future_sum(reward_BT, mask_BT, gamma)
    remaining_BT = mask_BT.flip(1).cumsum(1).flip(1)  # masked tokens from t to the end of the row
    normalised_BT = future_BT / remaining_BT.clamp(min=1)
    next_BT = torch.cat([normalised_BT[:, 1:], torch.zeros_like(normalised_BT[:, :1])], dim=1) * mask_BT
    if baseline is None:
        baseline = float(next_BT.sum() / mask_BT.sum().clamp(min=1))
    return (next_BT - baseline) * mask_BT


def kl_terms(logp_a_BTV: torch.Tensor, logp_b_BTV: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) per position = Σ_v a_v (log a_v - log b_v), with 0 log 0 = 0: where a has no mass the term
    vanishes whatever b says there (masked before the product, so neither value nor gradient sees -inf)."""
    log_ratio_BTV = (logp_a_BTV - logp_b_BTV).masked_fill(torch.isneginf(logp_a_BTV), 0.0)
    return (logp_a_BTV.exp() * log_ratio_BTV).sum(-1)


def _jsd_positions(
    student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, beta: float, temperature: float
) -> torch.Tensor:
    student_BTV = torch.log_softmax(at_least_fp32(student_logits_BTV) / temperature, dim=-1)
    teacher_BTV = torch.log_softmax(at_least_fp32(teacher_logits_BTV) / temperature, dim=-1)
    if beta == 0.0:
        return kl_terms(teacher_BTV, student_BTV)
    if beta == 1.0:
        return kl_terms(student_BTV, teacher_BTV)
    mixture_BTV = torch.logaddexp(student_BTV + math.log1p(-beta), teacher_BTV + math.log(beta))
    return beta * kl_terms(teacher_BTV, mixture_BTV) + (1 - beta) * kl_terms(student_BTV, mixture_BTV)


def generalized_jsd(
    student_logits_BTV: torch.Tensor,
    teacher_logits_BTV: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Per-position generalized JSD between teacher q and student p over the full vocabulary (GKD, Agarwal
    et al. 2023; math.md §3). JSD_β = β KL(q ‖ m) + (1-β) KL(p ‖ m), m = β q + (1-β) p, with TRL's
    endpoints: β = 0 is exactly the forward KL(q ‖ p), β = 1 exactly the reverse KL(p ‖ q).

    Both sides are divided by the loss temperature τ before the softmax; the teacher may be given as logits
    or as log-probs at τ = 1 (re-normalising logp/τ equals softmax(logits/τ)). Gradient flows into the
    student only, at fixed states (direct branch). Returns [B, T], computed in chunks of positions.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd needs 0 <= beta <= 1, got {beta}")
    return per_position(
        partial(_jsd_positions, beta=beta, temperature=temperature),
        student_logits_BTV,
        teacher_logits_BTV,
        chunk_elements=chunk_elements,
    )


def support_contains(ids_BTK: torch.Tensor, other_BTJ: torch.Tensor) -> torch.Tensor:
    """[B, T, K] bool: whether each id of ``ids`` is among ``other``'s ids at the same position."""
    return (ids_BTK[..., :, None] == other_BTJ[..., None, :]).any(-1)


Pair = tuple[torch.Tensor | None, torch.Tensor | None]


def topk_support(
    support: str,
    teacher_topk: Pair = (None, None),
    at_student_ids: Pair = (None, None),
    student_ids_BTK: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, teacher log-probs, valid) of a top-K support (math.md §5.1-5.2), each [B, T, K'].

    ``teacher_topk``: the teacher's own top-K ids and log-probs (L1); ``at_student_ids``: the student's
    top-K ids and the teacher's log-probs there (L1s). student = the latter; teacher = the former;
    union = the teacher's ids then the student's, the duplicates invalid (K' = 2K); intersect = the
    teacher's ids that are among ``student_ids_BTK`` (T5; the student's side is local, so L1 suffices).
    """
    if support in ("teacher", "union", "intersect"):
        ids_BTK, logp_BTK = teacher_topk
        if ids_BTK is None or logp_BTK is None:
            raise ValueError(f"a {support!r} support needs the teacher's top-K (L1)")
    if support in ("student", "union"):
        student_ids, student_logp = at_student_ids
        if student_ids is None or student_logp is None:
            raise ValueError(f"a {support!r} support needs teacher log-probs at the student's ids (L1s)")
        if support == "student":
            return student_ids, student_logp, torch.ones_like(student_ids, dtype=torch.bool)
        fresh_BTK = ~support_contains(student_ids, ids_BTK)
        valid_BTK = torch.cat([torch.ones_like(ids_BTK, dtype=torch.bool), fresh_BTK], dim=-1)
        return torch.cat([ids_BTK, student_ids], -1), torch.cat([logp_BTK, student_logp], -1), valid_BTK
    if support == "intersect":
        if student_ids_BTK is None:
            raise ValueError("an 'intersect' support needs the student's top-K ids")
        return ids_BTK, logp_BTK, support_contains(ids_BTK, student_ids_BTK)
    if support == "teacher":
        return ids_BTK, logp_BTK, torch.ones_like(ids_BTK, dtype=torch.bool)
    raise ValueError(f"unknown top-K support {support!r}")


def _topk_positions(
    logits_BTV: torch.Tensor,
    ids_BTK: torch.Tensor,
    teacher_logp_BTK: torch.Tensor,
    valid_BTK: torch.Tensor,
    variant: TopKVariant,
) -> torch.Tensor:
    logits_BTV = at_least_fp32(logits_BTV)
    student_BTK = (logits_BTV.gather(-1, ids_BTK) - logits_BTV.logsumexp(-1, keepdim=True)).masked_fill(
        ~valid_BTK, MASKED
    )
    teacher_BTK = at_least_fp32(teacher_logp_BTK).masked_fill(~valid_BTK, MASKED)
    p_BTK, log_ratio_BTK = student_BTK.exp(), (student_BTK - teacher_BTK).masked_fill(~valid_BTK, 0.0)
    if variant == "raw":
        return (p_BTK * log_ratio_BTK).sum(-1)
    if variant == "sg":
        return (p_BTK * log_ratio_BTK.detach()).sum(-1)
    if variant == "fkl":
        return (teacher_BTK.exp() * -log_ratio_BTK).sum(-1)
    if variant == "renorm":
        s_hat_BTK = student_BTK - student_BTK.logsumexp(-1, keepdim=True)
        t_hat_BTK = teacher_BTK - teacher_BTK.logsumexp(-1, keepdim=True)
        return (s_hat_BTK.exp() * (s_hat_BTK - t_hat_BTK).masked_fill(~valid_BTK, 0.0)).sum(-1)
    if variant == "tail":
        tail_p_BT = (1 - p_BTK.sum(-1)).clamp(min=TAIL_FLOOR)
        tail_q_BT = (1 - teacher_BTK.exp().sum(-1)).clamp(min=TAIL_FLOOR)
        return (p_BTK * log_ratio_BTK).sum(-1) + tail_p_BT * (tail_p_BT.log() - tail_q_BT.log())
    if variant == "pg":
        weight_BTK = torch.softmax(student_BTK.detach(), dim=-1)
        ratio_BTK = torch.exp(student_BTK - student_BTK.detach())
        return (weight_BTK * log_ratio_BTK.detach() * ratio_BTK).sum(-1)
    raise ValueError(f"unknown top-K variant {variant!r}")


def topk_divergence(
    student_logits_BTV: torch.Tensor,
    ids_BTK: torch.Tensor,
    teacher_logp_BTK: torch.Tensor,
    variant: TopKVariant,
    valid_BTK: torch.Tensor | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Reverse KL restricted to a support S of K ids per position (math.md §5.1), [B, T].

    ``ids`` and the teacher's log-probs at them come from the teacher (L1, its own top-K), from the caller
    (L1s, e.g. the student's top-K), or both (union); ``valid`` drops slots (duplicates of a union, ids
    outside an intersection). The student side is computed here from its logits. Variants:
    raw  T1  Σ_S p ℓ: biased, its gradient adds ∇m_S and pushes mass out of S (I5b; Many Faces);
    sg   T2  Σ_S p sg(ℓ): the exact reverse-KL gradient restricted to S (I5a), Many Faces' fix;
    renorm T3/T5  KL(p̂ ‖ q̂) with both renormalised on S (LSM, Fu et al.; I16a); on the intersection of
             the two top-K sets it is T5 (sg on log p̂ changes nothing: Σ_S p̂ ∇log p̂ = 0) [D];
    tail T4  KL over S plus one tail bucket (TRL DistillationTrainer): a lower bound on the full KL (I16b);
    pg   T6  Σ_S w sg(ℓ) ρ with w = softmax_S(log p) detached and ρ = p/sg(p): thunlp's student-weighted
             top-K policy gradient; at S = V its gradient is the exact one (I13);
    fkl      Σ_S q (log q - log p), the un-renormalised forward KL on the teacher's top-K (EOPD's term,
             math.md §7.2); like raw it is not stationary at q = p: its gradient there is -∇m_S, pulling mass
    into S. At S = V every variant but fkl is the full reverse KL (I5c); fkl is then the full forward KL.
    """
    if valid_BTK is None:
        valid_BTK = torch.ones_like(ids_BTK, dtype=torch.bool)
    return per_position(
        partial(_topk_positions, variant=variant),
        student_logits_BTV,
        ids_BTK,
        teacher_logp_BTK,
        valid_BTK,
        chunk_elements=chunk_elements,
    )


def clip_divergence(
    divergence_BT: torch.Tensor, mask_BT: torch.Tensor, limit: float, soft: bool = False
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token clipped divergence (OPSD launchers, Open-OPD; math.md §6.2): min(D_t, c), so a few
    high-divergence tokens cannot dominate the gradient; clipped tokens get zero gradient. ``soft``: the [D]
    variant c·tanh(D/c), bounded by c but with gradient everywhere. Logs ``token_clip_frac`` = share of
    masked tokens with D_t > c."""
    clipped_BT = limit * torch.tanh(divergence_BT / limit) if soft else divergence_BT.clamp(max=limit)
    over = divergence_BT.detach()[mask_BT.bool()] > limit
    return clipped_BT, {"token_clip_frac": float(over.float().mean()) if over.numel() else 0.0}


@dataclass(frozen=True)
class Normalizer:
    """How a step's per-token losses become one number (math.md §1.5), from the step's global counts
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


# --- spans of a teacher with another tokenizer (math.md §18) -----------------------------------------------


def span_sums(values_BT: torch.Tensor, span_BT: torch.Tensor) -> torch.Tensor:
    """Each span's total of ``values`` at its last position, 0 elsewhere (``span_BT``: each position's span,
    counted from 0 along its row in runs, -1 on pad). With one position per span it is ``values`` on the
    spans' positions."""
    return _span_totals(values_BT, span_BT) * span_ends(span_BT)


def span_fill(values_BT: torch.Tensor, span_BT: torch.Tensor) -> torch.Tensor:
    """Each position given its span's value at the span's last position (0 on pad): a span's advantage for
    every token of it."""
    return _span_totals(values_BT * span_ends(span_BT), span_BT)


def span_ends(span_BT: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the last position of each span."""
    following_BT = torch.cat([span_BT[:, 1:], span_BT.new_full((span_BT.shape[0], 1), -1)], dim=1)
    return (span_BT >= 0) & (following_BT != span_BT)


def _span_totals(values_BT: torch.Tensor, span_BT: torch.Tensor) -> torch.Tensor:
    """Each position given its span's total of ``values`` (0 on pad)."""
    valid_BT = span_BT >= 0
    index_BT = span_BT.clamp(min=0)
    totals_BS = values_BT.new_zeros(values_BT.shape[0], values_BT.shape[1] + 1)
    return totals_BS.scatter_add(1, index_BT, values_BT * valid_BT).gather(1, index_BT) * valid_BT
