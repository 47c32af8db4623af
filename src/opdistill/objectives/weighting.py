"""Pure token weights, masks and advantages (math.md §7, §8, §12): tensors in, tensors out.

Nothing here sees a model, tokenizer, config or process group. Conventions: [B, T] tensors with an explicit
boolean ``mask_BT`` (True on completion tokens that receive loss), per-sequence [B] tensors, and rows of one
prompt group consecutive (B = N·G with ``group_size`` = G). Statistics use masked tokens only. Every returned
weight or mask is detached, is zero/False on unmasked positions, and metrics are Python floats.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from opdistill.objectives.losses import at_least_fp32

SKIP, RKL, FKL = 0, 1, 2  # SEAD zones (math.md §7.7)


def _masked_quantile(values_BT: torch.Tensor, mask_BT: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row q-quantile (linear interpolation) over the masked entries: [B]; 0 for a row with none."""
    filled_BT = torch.where(mask_BT, values_BT, torch.full_like(values_BT, math.nan))
    return torch.nanquantile(filled_BT, q, dim=1).nan_to_num(0.0)


def _batch_quantile(values_BT: torch.Tensor, mask_BT: torch.Tensor, q: float) -> torch.Tensor:
    """q-quantile over all masked entries of the batch: a 0-dim tensor."""
    return _masked_quantile(values_BT.reshape(1, -1), mask_BT.reshape(1, -1), q)[0]


def _masked_row_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Per-row mean over the masked entries: [B]; 0 for a row with none."""
    return torch.where(mask_BT, values_BT, 0.0).sum(1) / mask_BT.sum(1).clamp(min=1)


def _mean_abs_deviation(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Per-row mean |v - mean(v)| over the masked entries: [B]."""
    centre_B1 = _masked_row_mean(values_BT, mask_BT)[:, None]
    return _masked_row_mean((values_BT - centre_B1).abs(), mask_BT)


def _by_group(values_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] → [N, G] with the G consecutive rows of one prompt on a row."""
    if group_size < 1 or values_B.shape[0] % group_size:
        raise ValueError(f"batch of {values_B.shape[0]} rows does not split into groups of {group_size}")
    return values_B.reshape(-1, group_size)


def position_decay(mask_BT: torch.Tensor, alpha: float, max_len: int, hard_limit: int = 0) -> torch.Tensor:
    """Open-OPD position-decay weights w_t = exp(-α t / L_max) at 0-based response position t (docs/math.md
    math.md §8.4; α ∈ [1, 5]), the cheap baseline for every horizon method. ``hard_limit`` > 0 zeroes t ≥
    L_kl_max (the loop masks those tokens instead, so they also leave the token count). Shapes: mask [B, T] →
    w [B, T] float32, zero on unmasked positions."""
    mask_BT = mask_BT.bool()
    t_T = torch.arange(mask_BT.shape[1], device=mask_BT.device, dtype=torch.float32)
    w_T = torch.exp(-alpha * t_T / max_len)
    if hard_limit > 0:
        w_T = w_T * (t_T < hard_limit)
    return w_T * mask_BT


def window_mask(
    mask_BT: torch.Tensor,
    n: int,
    where: Literal["first", "last", "random"] = "first",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Loss only on n masked tokens per row: the first n (prefix-only OPD, math.md §8.3, Zhou et al. /
    Zhang et al. 2026), or the [D] control experiments at an equal budget: the last n, or n drawn uniformly
    without replacement (reproducible from ``generator``). Rows with ≤ n masked tokens keep them all.
    Shapes: [B, T] bool → [B, T] bool."""
    mask_BT = mask_BT.bool()
    if where == "first":
        rank_BT = mask_BT.cumsum(1)  # 1-based rank among the row's masked tokens
    elif where == "last":
        rank_BT = mask_BT.flip(1).cumsum(1).flip(1)
    elif where == "random":
        # unmasked positions get noise 2 > any U[0, 1) draw, so the masked tokens take ranks 1..count
        # drawn on the generator's device (the CPU: one stream whatever the device), then moved
        noise_BT = torch.rand(mask_BT.shape, generator=generator).to(mask_BT.device)
        rank_BT = noise_BT.masked_fill(~mask_BT, 2.0).argsort(1).argsort(1) + 1
    else:
        raise ValueError(f"window_mask where must be 'first', 'last' or 'random', got {where!r}")
    return mask_BT & (rank_BT <= n)


def iw_opd_weights(
    teacher_logp_BT: torch.Tensor,
    rollout_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    gamma: float,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, dict[str, float]]:
    """IW-OPD position weights (Xie et al. 2026, "On the Position Bias of OPD"; math.md §7.5, I12),
    as in TRL ``_compute_iw_opd_loss``: a_t = (log p_T - log p_rollout) m_t, P_t = Σ_{s<t} |a_s|,
    S = max(Σ_s |a_s|, ε), w_t = 1 + γ (1 - P_t / S) ∈ [1, 1+γ], non-increasing, 1+γ at the first token:
    tokens after a large accumulated discrepancy sit on drifted prefixes. Shapes: [B, T] → (w_BT, metrics);
    w is zero on unmasked positions (TRL leaves it there and masks the loss instead)."""
    mask_BT = mask_BT.bool()
    diff_BT = at_least_fp32(teacher_logp_BT.detach()) - at_least_fp32(rollout_logp_BT.detach())
    abs_BT = torch.where(mask_BT, diff_BT, 0.0).abs()  # where(): padding log-probs may be -inf
    prefix_BT = abs_BT.cumsum(1) - abs_BT
    total_B1 = abs_BT.sum(1, keepdim=True).clamp(min=eps)
    w_BT = torch.where(mask_BT, 1 + gamma * (1 - prefix_BT / total_B1), 0.0)
    kept = w_BT[mask_BT] if mask_BT.any() else torch.ones(1)
    return w_BT, {
        "iw_weight_mean": float(kept.mean()),
        "iw_weight_min": float(kept.min()),
        "iw_weight_max": float(kept.max()),
    }


def _min_max(values_N: torch.Tensor) -> torch.Tensor:
    """(v - min) / (max - min), or all zeros when max == min."""
    span = values_N.max() - values_N.min()
    return (values_N - values_N.min()) / span if span > 0 else torch.zeros_like(values_N)


def tip_keep_mask(
    entropy_BT: torch.Tensor, divergence_BT: torch.Tensor, mask_BT: torch.Tensor, ratio: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """TIP's deterministic soft-OR selector (Xu et al. 2026, arXiv 2604.14084; math.md §7.1, [S*]):
    batch min-max normalise student entropy ĥ and teacher-student divergence δ̂ over masked tokens, score
    s = ĥ + δ̂ - ĥδ̂, keep the top ⌊ρN⌋ of the N masked tokens. Low-entropy, high-divergence tokens
    ("overconfident and wrong", Q3) thus survive alongside uncertain ones. Ties go to the earlier flat
    position (stable sort). Min-max is scale-free, so raw H and JSD serve as well as H/ln V and JSD/ln 2.
    Shapes: [B, T] → (keep_BT bool, metrics)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"tip_keep_mask needs 0 <= ratio <= 1, got {ratio}")
    mask_BT = mask_BT.bool()
    keep_BT = torch.zeros_like(mask_BT)
    count = int(mask_BT.sum())
    n_keep = math.floor(ratio * count + 1e-9)  # + 1e-9: 0.29 · 100 is 28.999… in floating point
    if n_keep == 0:
        return keep_BT, {"tip_kept_frac": 0.0}
    entropy_N = _min_max(at_least_fp32(entropy_BT.detach())[mask_BT])
    divergence_N = _min_max(at_least_fp32(divergence_BT.detach())[mask_BT])
    score_N = entropy_N + divergence_N - entropy_N * divergence_N
    kept_N = torch.zeros(count, dtype=torch.bool, device=mask_BT.device)
    kept_N[torch.sort(score_N, descending=True, stable=True).indices[:n_keep]] = True
    keep_BT[mask_BT] = kept_N
    return keep_BT, {"tip_kept_frac": n_keep / count}


def entropy_gate(
    teacher_entropy_BT: torch.Tensor, mask_BT: torch.Tensor, threshold: float = 0.8
) -> torch.Tensor:
    """EOPD's gate (Jin et al. 2026, arXiv 2603.07079; math.md §7.2, [S*]): True on masked tokens whose
    teacher entropy exceeds τ nats (0.8, full vocabulary), where the top-K forward-KL term is added to the
    PG-RKL loss. Shapes: [B, T] → [B, T] bool."""
    return mask_BT.bool() & (teacher_entropy_BT.detach() > threshold)


def sequence_perplexity(logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """PPL(y) = exp(-mean_t log p(y_t)) over each row's masked tokens (SCOPE, Zheng et al. 2026; docs/math.md
    math.md §7.3). Shapes: [B, T] → [B]; a row without masked tokens has PPL 1."""
    mask_BT = mask_BT.bool()
    return torch.exp(-_masked_row_mean(at_least_fp32(logp_BT.detach()), mask_BT))


def scope_weights(
    student_ppl_B: torch.Tensor,
    teacher_ppl_B: torch.Tensor,
    correct_B: torch.Tensor,
    group_size: int,
    tau: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SCOPE dual-path weights (Zheng et al. 2026, arXiv 2604.10688; math.md §7.3): within each prompt
    group, correct rows get PPL_S^{1/τ} normalised over the group's correct rows (amplify low-confidence
    correct paths, MLE branch) and incorrect rows PPL_T^{-1/τ} normalised over its incorrect rows (down-weight
    flawed prefixes the teacher finds unlikely, OPD branch); computed as a softmax of log-PPL. Each non-empty
    branch sums to 1 per prompt; an empty one contributes nothing ([D]). Shapes: [B] → (w_B, metrics)."""
    correct_NG = _by_group(correct_B.bool(), group_size)
    log_student_NG = _by_group(at_least_fp32(student_ppl_B.detach()).log(), group_size)
    log_teacher_NG = _by_group(at_least_fp32(teacher_ppl_B.detach()).log(), group_size)
    logits_NG = torch.where(correct_NG, log_student_NG / tau, -log_teacher_NG / tau)
    w_NG = torch.zeros_like(logits_NG)
    for branch_NG in (correct_NG, ~correct_NG):
        # a group with an empty branch softmaxes all -inf: NaN, which becomes weight 0
        w_NG += torch.softmax(logits_NG.masked_fill(~branch_NG, -math.inf), dim=1).nan_to_num(0.0)
    w_B = w_NG.reshape(-1)
    return w_B, {
        "scope_weight_min": float(w_B.min()),
        "scope_weight_max": float(w_B.max()),
        "scope_correct_frac": float(correct_NG.float().mean()),
    }


def grpo_advantage(
    reward_B: torch.Tensor, group_size: int, eps: float = 1e-6, scale: bool = True
) -> torch.Tensor:
    """GRPO group-relative advantage (R - mean_group R) / (std_group R + ε) with the unbiased std, as TRL
    (math.md §12); ``scale=False`` only centres (Dr. GRPO). A group of one has advantage exactly 0, the
    n = 1 pitfall of math.md §12. Shapes: [B] → [B]."""
    reward_NG = _by_group(at_least_fp32(reward_B.detach()), group_size)
    centred_NG = reward_NG - reward_NG.mean(1, keepdim=True)
    if scale and group_size > 1:  # torch.std of one sample is NaN
        centred_NG = centred_NG / (reward_NG.std(1, keepdim=True) + eps)
    return centred_NG.reshape(-1)


def group_extremes(score_B: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(best_B, worst_B): per group of ``group_size`` consecutive rows, the row of the highest score and the
    row of the lowest (the first on a tie; in a group whose scores are all equal both are its first row,
    and such a group forms no pair, math.md §17). Shapes: [B] → ([B] bool, [B] bool)."""
    score_NG = _by_group(score_B.detach(), group_size)
    rows_NG = torch.arange(score_B.shape[0], device=score_B.device).reshape(score_NG.shape)
    best_B = torch.zeros(score_B.shape, dtype=torch.bool, device=score_B.device)
    worst_B = torch.zeros_like(best_B)
    best_B[rows_NG.gather(1, score_NG.argmax(1, keepdim=True))] = True
    worst_B[rows_NG.gather(1, score_NG.argmin(1, keepdim=True))] = True
    return best_B, worst_B


def sequence_score(
    rank_by: Literal["teacher", "verifier", "verifier+teacher"],
    teacher_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    reward_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """How the teacher ranks the student's samples (math.md §17): ``teacher`` = its mean log-prob per token
    of the sample (length-normalised sequence log-likelihood), ``verifier`` = the reward, ``verifier+teacher``
    = the reward first, the teacher's likelihood breaking ties (it lies in (-∞, 0], so adding it to a
    reward of 0/1 scaled by a bound on it keeps the reward's order). Shapes: [B, T] → [B]."""
    likelihood_B = _masked_row_mean(at_least_fp32(teacher_logp_BT.detach()), mask_BT)
    if rank_by == "teacher":
        return likelihood_B
    assert reward_B is not None, f"rank_by={rank_by} needs each sample's verifier reward"
    reward_B = at_least_fp32(reward_B.detach())
    if rank_by == "verifier":
        return reward_B
    spread = (likelihood_B.max() - likelihood_B.min()).clamp(min=1.0)
    return reward_B + 0.5 * (likelihood_B - likelihood_B.max()) / spread


def route_weights(
    correct_B: torch.Tensor, route: Literal["all", "failed_only", "correct_only"] = "all"
) -> torch.Tensor:
    """Per-sample routing of a loss component by verifier outcome (math.md §12 ``route_opd``, [D]; SCOPE
    and slime's ``opd_distill_sample_mask``): 1.0 on the rows the component applies to, else 0. [B] → [B]."""
    correct_B = correct_B.bool()
    if route == "all":
        return torch.ones(correct_B.shape, device=correct_B.device)
    if route == "failed_only":
        return (~correct_B).float()
    if route == "correct_only":
        return correct_B.float()
    raise ValueError(f"route must be 'all', 'failed_only' or 'correct_only', got {route!r}")


def dasd_advantage(
    delta_BT: torch.Tensor,
    student_entropy_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    group_advantage_B: torch.Tensor,
    beta: float = 1.0,
    rho: float = 0.2,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DASD direction-adaptive advantage (Zhang et al. 2026, arXiv 2605.22263; math.md §7.4, [S*]
    formula): with δ_t = log p_T(y_t) - log p_S(y_t), δ̄ = δ / (MAD(δ) + ε) ([D] per-trajectory
    mean-absolute-deviation scale), τ_ρ the entropy above which the row's top-ρ share of tokens lies (its
    (1-ρ)-quantile, linear interpolation) and σ_H the mean absolute deviation (≥ ε) of the row's student
    entropies, ω = tanh((τ_ρ - H_S)/σ_H) · sigmoid(|δ̄| - 1) and Â_t = A_G + β ω δ̄. Low-entropy scaffolding
    tokens (ω > 0) are pulled to the teacher, the high-entropy forking minority pushed away. [D] reading of
    "ρ-quantile, ρ = 0.2": ρ is the forking share (the 20% high-entropy minority of Wang et al. 2025), not
    the 0.2-quantile, which would push 80% of tokens away from the teacher. Shapes: [B, T], A_G [B] →
    (Â_BT, metrics), 0 on unmasked positions; ``dasd_pull_frac`` = share of masked tokens with ω > 0,
    ``dasd_scaffold_kl`` = mean -δ over them (the divergence DASD lowers; it raises it on forking tokens)."""
    mask_BT = mask_BT.bool()
    delta_BT = torch.where(mask_BT, at_least_fp32(delta_BT.detach()), 0.0)
    entropy_BT = torch.where(mask_BT, at_least_fp32(student_entropy_BT.detach()), 0.0)
    delta_bar_BT = delta_BT / (_mean_abs_deviation(delta_BT, mask_BT)[:, None] + eps)
    tau_B1 = _masked_quantile(entropy_BT, mask_BT, 1 - rho)[:, None]
    sigma_B1 = _mean_abs_deviation(entropy_BT, mask_BT).clamp(min=eps)[:, None]
    omega_BT = torch.tanh((tau_B1 - entropy_BT) / sigma_B1) * torch.sigmoid(delta_bar_BT.abs() - 1)
    advantage_BT = group_advantage_B.detach()[:, None] + beta * omega_BT * delta_bar_BT
    advantage_BT = torch.where(mask_BT, advantage_BT, 0.0)
    pulled = omega_BT[mask_BT] > 0
    if not pulled.any():
        return advantage_BT, {"dasd_pull_frac": 0.0, "dasd_scaffold_kl": 0.0}
    return advantage_BT, {  # the sampled reverse-KL estimate on the tokens pulled toward the teacher
        "dasd_pull_frac": float(pulled.float().mean()),
        "dasd_scaffold_kl": float(-delta_BT[mask_BT][pulled].mean()),
    }


def kat_trap_mask(
    kl_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    threshold: float,
    window: int = 64,
    patience: int = 3,
    min_position: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KAT's KL-agreement trap (Xin et al. 2026, arXiv 2606.09471; math.md §7.6, [D] rule): the KL
    stream k (exact RKL_t, or max(ℓ_t, 0)) is averaged over masked tokens in windows of width W, stride W,
    from ``min_position``; only windows ending inside the row (last masked position + 1) count. A row is
    trapped at the first window j* with windows j*..j*+P-1 all below ``threshold`` (persistent teacher
    agreement with a drifted prefix) and tokens t ≥ start(j*) lose their loss; rows shorter than
    t_min + P·W never trap. Shapes: [B, T] → (keep_BT bool, trapped_B bool)."""
    mask_BT = mask_BT.bool()
    num_windows = max(0, (mask_BT.shape[1] - min_position) // window)
    trapped_B = torch.zeros(mask_BT.shape[0], dtype=torch.bool, device=mask_BT.device)
    if num_windows < patience:
        return mask_BT, trapped_B
    span, windows = slice(min_position, min_position + num_windows * window), (num_windows, window)
    kl_BJW = torch.where(mask_BT, at_least_fp32(kl_BT.detach()), 0.0)[:, span].unflatten(1, windows)
    count_BJ = mask_BT[:, span].unflatten(1, windows).sum(-1)
    mean_BJ = kl_BJW.sum(-1) / count_BJ.clamp(min=1)
    length_B = torch.where(mask_BT.any(1), mask_BT.shape[1] - mask_BT.flip(1).int().argmax(1), 0)
    end_J = min_position + window * torch.arange(1, num_windows + 1, device=mask_BT.device)
    low_BJ = (end_J <= length_B[:, None]) & (count_BJ > 0) & (mean_BJ < threshold)
    run_BJ = low_BJ.unfold(1, patience, 1).all(-1)  # run_BJ[b, j]: windows j..j+P-1 all low
    trapped_B = run_BJ.any(1)
    start_B = torch.where(trapped_B, min_position + window * run_BJ.int().argmax(1), mask_BT.shape[1])
    positions_T = torch.arange(mask_BT.shape[1], device=mask_BT.device)
    return mask_BT & (positions_T < start_B[:, None]), trapped_B


def kat_threshold(
    kl_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    previous_ema: float | None,
    kappa: float = 0.25,
    decay: float = 0.9,
) -> tuple[float, float]:
    """KAT's training-adaptive threshold (math.md §7.6, [D]): EMA ← decay·EMA + (1-decay)·median of the
    batch's masked k (the median itself at the first step; the old EMA when nothing is masked), τ = κ·EMA.
    Returns (threshold, new_ema) as floats; carry ``new_ema`` to the next step."""
    mask_BT = mask_BT.bool()
    if not mask_BT.any():
        ema = previous_ema if previous_ema is not None else 0.0
        return kappa * ema, ema
    median = float(_batch_quantile(at_least_fp32(kl_BT.detach()), mask_BT, 0.5))
    ema = median if previous_ema is None else decay * previous_ema + (1 - decay) * median
    return kappa * ema, ema


def sead_zones(
    teacher_entropy_BT: torch.Tensor,
    student_entropy_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    skip_percentile: float = 50,
    fkl_percentile: float = 90,
) -> torch.Tensor:
    """SEAD token zones (Lee et al. 2026, arXiv 2606.28562; math.md §7.7, [D] thresholds from batch
    percentiles over masked tokens): FKL where H_T ≥ P_90(H_T) (teacher uncertain, takes precedence); SKIP
    where H_T ≤ P_50(H_T) and H_S ≤ P_50(H_S) (both confident); RKL otherwise; unmasked tokens are SKIP.
    Shapes: [B, T] → [B, T] int64 of ``SKIP``/``RKL``/``FKL``."""
    mask_BT = mask_BT.bool()
    teacher_BT = at_least_fp32(teacher_entropy_BT.detach())
    student_BT = at_least_fp32(student_entropy_BT.detach())
    teacher_skip = _batch_quantile(teacher_BT, mask_BT, skip_percentile / 100)
    teacher_fkl = _batch_quantile(teacher_BT, mask_BT, fkl_percentile / 100)
    student_skip = _batch_quantile(student_BT, mask_BT, skip_percentile / 100)
    zone_BT = torch.full(mask_BT.shape, RKL, dtype=torch.int64, device=mask_BT.device)
    zone_BT = zone_BT.masked_fill((teacher_BT <= teacher_skip) & (student_BT <= student_skip), SKIP)
    return zone_BT.masked_fill(teacher_BT >= teacher_fkl, FKL).masked_fill(~mask_BT, SKIP)


def sead_anneal(step: int, total_steps: int, start: float = 0.8) -> float:
    """SEAD's cosine-annealed forward-KL weight λ = start · ½(1 + cos(π · step / total)) (math.md §7.7,
    [S*] 0.8 → 0; forward → reverse KL as competence grows); held at 0 after ``total_steps``."""
    if total_steps <= 0:
        raise ValueError(f"sead_anneal needs total_steps > 0, got {total_steps}")
    return start * 0.5 * (1 + math.cos(math.pi * min(max(step, 0), total_steps) / total_steps))


def prune_weights(
    overlap_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    eta: float = 0.5,
    zeta: float = 0.9,
    max_events: int = 32,
    min_weight: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Prune-OPD cumulative reliability decay (Yang et al. 2026, arXiv 2605.07804; math.md §8.2, [D]
    formulas): a drift event is a masked token with top-K overlap o_t < η, n_t counts events up to and
    including t, w_t = ζ^{n_t}, hard-stopped to 0 once n_t ≥ N_max: monotone non-increasing along each row.
    Metrics: ``prune_effective_length`` = mean over rows of L_eff, the number of leading masked tokens with
    w ≥ w_min, and ``prune_kept_frac`` = share of masked tokens with w > 0.
    Shapes: [B, T] → (w_BT, metrics)."""
    mask_BT = mask_BT.bool()
    events_BT = mask_BT & (overlap_BT.detach() < eta)
    count_BT = events_BT.cumsum(1)
    w_BT = torch.full(mask_BT.shape, zeta, device=mask_BT.device).pow(count_BT)
    w_BT = torch.where(mask_BT & (count_BT < max_events), w_BT, 0.0)
    effective_length_B = (mask_BT & (w_BT >= min_weight)).sum(1).float()
    kept_frac = float((w_BT > 0).sum() / mask_BT.sum()) if mask_BT.any() else 0.0
    return w_BT, {"prune_effective_length": float(effective_length_B.mean()), "prune_kept_frac": kept_frac}


def sead_competence(step: int, total_steps: int, start: float = 0.3) -> float:
    """SEAD's competence threshold c(step) = c0 + (1 - c0) · min(1, step / (0.7 · total)) (math.md §7.7,
    [D]): at ``step`` the curriculum trains only on prompts whose difficulty d = 1 - pass rate ≤ c."""
    if total_steps <= 0:
        raise ValueError(f"sead_competence needs total_steps > 0, got {total_steps}")
    return start + (1 - start) * min(1.0, max(step, 0) / (0.7 * total_steps))


def through_last(mask_BT: torch.Tensor, keep_BT: torch.Tensor) -> torch.Tensor:
    """``mask`` cut after each row's last ``keep`` token: the reward stream of a response whose loss ends
    there (loss windows, KAT traps, position limits; math.md §7.6, §8.3), so discounted advantages of
    kept tokens do not see rewards of a dropped suffix. Rows with nothing kept become empty. [B, T] bool."""
    keep_BT = keep_BT.bool() & mask_BT.bool()
    positions_T = torch.arange(keep_BT.shape[1], device=keep_BT.device)
    last_B1 = torch.where(keep_BT, positions_T, -1).amax(dim=1, keepdim=True)
    return mask_BT.bool() & (positions_T <= last_B1)
