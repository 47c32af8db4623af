"""Pure diagnostics (math.md §11.4, §13): entropies, log-ratio health, top-k overlap and its mass and
advantage, teacher rank, per-position buckets, length pathology, diversity, pass@k, gap recovery and alarms.

Tensors, lists or strings in; numbers (or detached per-token tensors) out. Nothing here sees a model,
tokenizer or config. [B, T] tensors are completions (column t = response position t) with an explicit
``mask_BT``; an empty mask gives 0.0, an empty bucket None.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from itertools import pairwise

import torch

from opdistill.objectives.losses import at_least_fp32, masked_mean, per_position


def _entropy(logits_BTV: torch.Tensor) -> torch.Tensor:
    logp_BTV = torch.log_softmax(at_least_fp32(logits_BTV), dim=-1)
    return -(logp_BTV.exp() * logp_BTV).nan_to_num().sum(-1)


def token_entropy(logits_BTV: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) in nats at every position, detached, in chunks of positions: [B, T]."""
    return per_position(_entropy, logits_BTV.detach())


def high_entropy_rate(entropy_BT: torch.Tensor, mask_BT: torch.Tensor, threshold: float = 0.8) -> float:
    """Fraction of masked tokens whose entropy exceeds ``threshold`` nats (math.md §13.1; 0.8 = EOPD's
    gate). Vanilla OPD was reported to keep 6.8% such tokens against the teacher's 18.5%."""
    mask_BT = mask_BT.bool()
    return float((entropy_BT[mask_BT] > threshold).float().mean()) if mask_BT.any() else 0.0


def log_ratio_stats(log_ratio_BT: torch.Tensor, mask_BT: torch.Tensor) -> dict[str, float]:
    """Training-health numbers of the sampled log-ratio ℓ = log p_S(y) - log p_T(y) (math.md §13.6):
    ``teacher_kl`` = mean ℓ (the sampled reverse-KL estimate), ``abs_log_ratio`` = mean |ℓ|, and
    ``positive_log_ratio_frac`` = share of tokens with ℓ > 0 (negative reward; Fu et al.'s sign imbalance)."""
    mask_BT = mask_BT.bool()
    if not mask_BT.any():
        return {"teacher_kl": 0.0, "abs_log_ratio": 0.0, "positive_log_ratio_frac": 0.0}
    values = log_ratio_BT.detach()[mask_BT].float()
    return {
        "teacher_kl": float(values.mean()),
        "abs_log_ratio": float(values.abs().mean()),
        "positive_log_ratio_frac": float((values > 0).float().mean()),
    }


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021; math.md §13.2, I11):
    1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _shared_ids(student_ids_BTK: torch.Tensor, teacher_ids_BTK: torch.Tensor) -> torch.Tensor:
    """shared[b, t, i, j] = (student id i == teacher id j) at each position: [B, T, K, K] bool."""
    if student_ids_BTK.shape != teacher_ids_BTK.shape:
        raise ValueError(
            f"top-k id shapes differ: {tuple(student_ids_BTK.shape)} vs {tuple(teacher_ids_BTK.shape)}"
        )
    return student_ids_BTK.unsqueeze(-1) == teacher_ids_BTK.unsqueeze(-2)


def topk_overlap(student_ids_BTK: torch.Tensor, teacher_ids_BTK: torch.Tensor) -> torch.Tensor:
    """overlap@K = |TopK_S ∩ TopK_T| / K at every position (math.md §8.2, §13.3; Prune-OPD's local
    compatibility signal, Yang et al. 2026): the share of the student's top-K ids that are also the teacher's.
    Both id sets are assumed duplicate-free; K is the last dim. Shapes: [B, T, K] int ×2 → [B, T] float."""
    return _shared_ids(student_ids_BTK, teacher_ids_BTK).any(-1).sum(-1) / student_ids_BTK.shape[-1]


def overlap_stats(
    student_ids_BTK: torch.Tensor,
    student_logp_BTK: torch.Tensor,
    teacher_ids_BTK: torch.Tensor,
    teacher_logp_BTK: torch.Tensor,
    mask_BT: torch.Tensor,
) -> dict[str, float]:
    """Rethinking OPD's alignment diagnostics at student-visited states (Li, Zuo, He et al. 2026, arXiv
    2604.13016; math.md §11.4), from both models' top-k ids and full-vocabulary-normalised log-probs,
    as masked means over positions: ``overlap`` = |I|/k with I = S_p ∩ S_q, ``overlap_mass_student`` = Σ_I p,
    ``overlap_mass_teacher`` = Σ_I q, and ``overlap_advantage`` = mean_{v∈I} p̄(v)(log q̄(v) - log p̄(v)) with
    p̄, q̄ renormalised on I, over positions with I non-empty. Its sum over I is -KL(p̄ ‖ q̄), so it is ≤ 0
    and → 0 as OPD succeeds; the overlap and both masses rise (97–99% mass in successful runs). The teacher's
    log-prob at a student id is read from the teacher's top-k, which holds every id of I. Ids are assumed
    duplicate-free. Shapes: four [B, T, k] tensors and mask [B, T] → dict of floats."""
    mask_BT = mask_BT.bool()
    shared_BTKK = _shared_ids(student_ids_BTK, teacher_ids_BTK)
    in_both_BTK = shared_BTKK.any(-1)  # student's i-th id is in I
    teacher_logp_BT1K = at_least_fp32(teacher_logp_BTK.detach()).unsqueeze(-2)
    # the teacher's log-prob at the student's i-th id; -inf off I (where(): at most one j matches)
    teacher_at_student_BTK = torch.where(shared_BTKK, teacher_logp_BT1K, -math.inf).amax(-1)
    student_on_shared_BTK = at_least_fp32(student_logp_BTK.detach()).masked_fill(~in_both_BTK, -math.inf)
    # p̄, q̄: an empty I softmaxes all -inf to NaN, weight 0 there; xlogy(0, ·) = 0 drops ids off I
    p_bar_BTK = torch.softmax(student_on_shared_BTK, dim=-1).nan_to_num(0.0)
    q_bar_BTK = torch.softmax(teacher_at_student_BTK, dim=-1).nan_to_num(0.0)
    advantage_BTK = torch.xlogy(p_bar_BTK, q_bar_BTK) - torch.xlogy(p_bar_BTK, p_bar_BTK)
    size_BT = in_both_BTK.sum(-1)
    return {
        "overlap": masked_mean(size_BT / student_ids_BTK.shape[-1], mask_BT),
        "overlap_mass_student": masked_mean(student_on_shared_BTK.exp().sum(-1), mask_BT),
        "overlap_mass_teacher": masked_mean(teacher_at_student_BTK.exp().sum(-1), mask_BT),
        "overlap_advantage": masked_mean(
            advantage_BTK.sum(-1) / size_BT.clamp(min=1), mask_BT & (size_BT > 0)
        ),
    }


def entropy_gap(
    student_entropy_BT: torch.Tensor, teacher_entropy_BT: torch.Tensor, mask_BT: torch.Tensor
) -> float:
    """Mean entropy gap ΔH = |H(q_t) - H(p_t)| over masked tokens (math.md §11.4; Rethinking OPD, Li et
    al. 2026): it narrows when OPD succeeds and stays wide when it stalls. Shapes: [B, T] ×3 → float."""
    gap_BT = at_least_fp32(teacher_entropy_BT.detach()) - at_least_fp32(student_entropy_BT.detach())
    return masked_mean(gap_BT.abs(), mask_BT)


def teacher_rank(teacher_topk_ids_BTK: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
    """1-based rank of each sampled token among the teacher's top-k ids (most likely first), k + 1 when it is
    absent (math.md §13.3, §13.6; Open-OPD ``compute_teacher_rank_at_k``): sampled tokens drifting out
    of the teacher's top-k late in a response mark coverage decay. Shapes: [B, T, k], [B, T] → [B, T]
    int64."""
    hit_BTK = teacher_topk_ids_BTK == tokens_BT.unsqueeze(-1)
    k = teacher_topk_ids_BTK.shape[-1]
    return torch.where(hit_BTK.any(-1), hit_BTK.long().argmax(-1) + 1, k + 1)


def _bucket_means(
    values_BT: torch.Tensor, mask_BT: torch.Tensor, bucket_BT: torch.Tensor, n: int
) -> list[float | None]:
    """Mean of the masked values in each bucket 0..n-1 (None for an empty one); other bucket ids are
    dropped."""
    values_BT, mask_BT = at_least_fp32(values_BT.detach()), mask_BT.bool()
    means: list[float | None] = []
    for bucket in range(n):
        in_bucket_BT = mask_BT & (bucket_BT == bucket)
        means.append(masked_mean(values_BT, in_bucket_BT) if in_bucket_BT.any() else None)
    return means


def position_buckets(
    values_BT: torch.Tensor, mask_BT: torch.Tensor, edges: Sequence[int]
) -> list[float | None]:
    """Mean of a per-token quantity in response-position buckets [edges[i], edges[i+1]), the last open-ended
    (math.md §13.3, coverage decay; e.g. edges (0, 100, 500, 2000)): sampled ℓ, exact RKL, overlap,
    teacher rank, teacher entropy. Position = column index. Positions before edges[0] are dropped; an empty
    bucket gives None. Shapes: [B, T] ×2 → list of len(edges)."""
    if not edges or any(a >= b for a, b in pairwise(edges)):
        raise ValueError(f"position_buckets needs non-empty, strictly increasing edges; got {list(edges)}")
    t_T = torch.arange(values_BT.shape[1], device=values_BT.device)
    bucket_T = torch.bucketize(t_T, torch.tensor(edges, device=values_BT.device), right=True) - 1
    return _bucket_means(values_BT, mask_BT, bucket_T.expand_as(values_BT), len(edges))


def relative_buckets(values_BT: torch.Tensor, mask_BT: torch.Tensor, n: int = 10) -> list[float | None]:
    """Mean of a per-token quantity by fraction of each row's own length (math.md §13.3; deciles for
    n = 10): position t of a row of length L goes to bucket ⌊n t / L⌋, so bucket i covers [i/n, (i+1)/n) of
    every response. L runs to the row's last masked token (pass the completion mask). An empty bucket gives
    None. Shapes: [B, T] ×2 → list of n."""
    mask_BT = mask_BT.bool()
    t_T = torch.arange(mask_BT.shape[1], device=mask_BT.device)
    length_B1 = (torch.where(mask_BT, t_T, -1).amax(1, keepdim=True) + 1).clamp(min=1)
    return _bucket_means(values_BT, mask_BT, n * t_T // length_B1, n)


def abs_log_ratio_quantiles(
    log_ratio_BT: torch.Tensor, mask_BT: torch.Tensor, qs: Sequence[float] = (0.5, 0.9, 0.99)
) -> dict[str, float]:
    """Quantiles of |ℓ| = |log p_S(y) - log p_T(y)| over masked tokens (linear interpolation; docs/math.md
    math.md §13.3, §13.6): a widening upper tail flags tokens the teacher finds implausible (Fu et al. Fig.
    4). Keys ``abs_log_ratio_p50`` etc. Shapes: [B, T] ×2 → dict of floats (0.0 for an empty mask)."""
    values_N = at_least_fp32(log_ratio_BT.detach())[mask_BT.bool()].abs()
    keys = [f"abs_log_ratio_p{100 * q:g}" for q in qs]
    if not values_N.numel():
        return dict.fromkeys(keys, 0.0)
    quantiles = torch.quantile(values_N, torch.tensor(qs, dtype=values_N.dtype, device=values_N.device))
    return {key: float(value) for key, value in zip(keys, quantiles, strict=True)}


def truncation_rate(truncated_B: torch.Tensor | Sequence[bool]) -> float:
    """TruncRate: the fraction of rollouts that hit the length cap without EOS (math.md §13.5; StableOPD,
    Luo et al. 2026, where it goes to 1 within ~30 steps of a collapsing run). [B] bool → float."""
    truncated_B = torch.as_tensor(truncated_B, dtype=torch.float64)
    return float(truncated_B.mean()) if truncated_B.numel() else 0.0


def repetition_rate(texts: Sequence[str], tail_chars: int = 10_000, ratio: float = 10.0) -> float:
    """RepRate: the fraction of texts at least L = ``tail_chars`` characters long whose last L characters
    compress well, len(bytes) / len(zlib.compress(bytes)) > τ = ``ratio`` on UTF-8 (math.md §13.5;
    StableOPD, Luo et al. 2026, L = 10,000, τ = 10; shorten L for short tasks). Shorter texts count as not
    repetitive but stay in the denominator."""
    if tail_chars < 1:
        raise ValueError(f"repetition_rate needs tail_chars >= 1, got {tail_chars}")
    tails = [text[-tail_chars:].encode() for text in texts if len(text) >= tail_chars]
    repetitive = sum(len(tail) > ratio * len(zlib.compress(tail)) for tail in tails)
    return repetitive / len(texts) if texts else 0.0


def ngram_repeat_mask(tokens_BT: torch.Tensor, mask_BT: torch.Tensor, n: int = 3) -> torch.Tensor:
    """True on each token that completes an n-gram already seen earlier in its row (overlaps allowed), as
    Open-OPD's ``build_token_repetition_mask`` on the response (math.md §13.5, §8.1; StableOPD found
    repeated tokens carry 4–9× the mean advantage). Only n-grams whose n tokens are all masked count.
    Shapes: [B, T] int, [B, T] → [B, T] bool."""
    if n < 1:
        raise ValueError(f"ngram_repeat_mask needs n >= 1, got {n}")
    mask_BT = mask_BT.bool()
    repeat_BT = torch.zeros_like(mask_BT)
    if tokens_BT.shape[1] < n:
        return repeat_BT
    # window w holds tokens w .. w+n-1; prefixing its row index keeps different rows' n-grams apart
    grams_BWN, whole_BW = tokens_BT.unfold(1, n, 1), mask_BT.unfold(1, n, 1).all(-1)
    rows_BW = torch.arange(tokens_BT.shape[0], device=tokens_BT.device)[:, None].expand_as(whole_BW)
    keys_NX = torch.cat([rows_BW[whole_BW, None], grams_BWN[whole_BW]], dim=1)
    if not keys_NX.numel():
        return repeat_BT
    unique_UX, gram_N = torch.unique(keys_NX, dim=0, return_inverse=True)
    # keys are in row-major order, so a window repeats iff its n-gram first appeared at a smaller index
    order_N = torch.arange(len(gram_N), device=gram_N.device)
    first_U = torch.full((len(unique_UX),), len(gram_N), device=gram_N.device)
    first_U = first_U.scatter_reduce(0, gram_N, order_N, "amin")
    repeat_BT[:, n - 1 :][whole_BW] = order_N > first_U[gram_N]
    return repeat_BT


def repeated_token_rate(tokens_BT: torch.Tensor, mask_BT: torch.Tensor, n: int = 3) -> float:
    """Share of masked tokens that complete a repeated n-gram (``ngram_repeat_mask``; math.md §13.5)."""
    return masked_mean(ngram_repeat_mask(tokens_BT, mask_BT, n).float(), mask_BT)


def distinct_answers(answers_per_prompt: Sequence[Sequence[str]]) -> float:
    """Mean number of distinct final answers among each prompt's samples (math.md §13.4): a count, not a
    fraction, so it reads as "how many answers does the student still consider"; divide by n for a fraction.
    It falls toward 1 as diversity collapses. 0.0 for no prompts."""
    if not answers_per_prompt:
        return 0.0
    return sum(len(set(answers)) for answers in answers_per_prompt) / len(answers_per_prompt)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """distinct-n on characters (math.md §13.4; Li et al. 2016): distinct character n-grams over all
    responses / total character n-grams, pooled across responses (this project's tasks are character
    tokenised). 1.0 = no n-gram repeats anywhere; 0.0 when no text has n characters."""
    grams = [text[i : i + n] for text in texts for i in range(len(text) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def gap_recovery(acc_after: float, acc_before: float, acc_teacher: float) -> float | None:
    """(Acc_after - Acc_before) / (Acc_teacher - Acc_before) (math.md §11.4; Rethinking OPD, Li et al.
    2026): 1 = the student reached the teacher, 0 = no gain, < 0 = it got worse. None when the teacher is not
    better than the student was, so there is no gap to recover."""
    if acc_teacher <= acc_before:
        return None
    return (acc_after - acc_before) / (acc_teacher - acc_before)


def diversity_collapse(student_her: float, teacher_her: float, ratio: float = 0.5) -> bool:
    """Alarm when the student's high-entropy-token rate falls below ``ratio`` × the teacher's (docs/math.md
    math.md §13.1; EOPD, Jin et al. 2026, saw 6.8% vs 18.5% under vanilla OPD). Never fires for a teacher rate
    of 0."""
    return student_her < ratio * teacher_her


def rising(values: Sequence[float], evals: int) -> bool:
    """True when the last ``evals`` values are strictly increasing (math.md §13.1: e.g. "teacher_kl
    rising for M evals"); False while fewer than ``evals`` values exist."""
    if evals < 2:
        raise ValueError(f"rising needs evals >= 2 to compare values, got {evals}")
    return len(values) >= evals and all(a < b for a, b in pairwise(values[-evals:]))


def no_progress(
    kl_per_eval: Sequence[float],
    acc_per_eval: Sequence[float],
    evals: int,
    min_kl: float,
    flat: float,
    margin: float,
) -> bool:
    """The failing OPD regime (math.md §11.1, §11.4: failing runs stall from the start): over the last
    ``evals`` evaluations the mean teacher_kl is flat, its relative change first → last under ``flat``,
    and far from zero, every value above ``min_kl``, while the accuracy rose by at most ``margin``. The
    two histories are read from their ends (entry i of each belongs to the same evaluation); False while
    either holds fewer than ``evals`` values."""
    if evals < 2:
        raise ValueError(f"no_progress needs evals >= 2 to compare values, got {evals}")
    if len(kl_per_eval) < evals or len(acc_per_eval) < evals:
        return False
    kl, acc = kl_per_eval[-evals:], acc_per_eval[-evals:]
    return min(kl) > min_kl and abs(kl[-1] - kl[0]) < flat * kl[0] and acc[-1] - acc[0] <= margin
