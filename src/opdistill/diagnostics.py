"""Pure diagnostics (ALGORITHMS.md §13): entropies, log-ratio health, top-k overlap, pass@k.

Tensors in, numbers (or detached per-token tensors) out.
"""

from __future__ import annotations

import math

import torch

from opdistill.losses import at_least_fp32, per_position


def _entropy(logits_BTV: torch.Tensor) -> torch.Tensor:
    logp_BTV = torch.log_softmax(at_least_fp32(logits_BTV), dim=-1)
    return -(logp_BTV.exp() * logp_BTV).nan_to_num().sum(-1)


def token_entropy(logits_BTV: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) in nats at every position, detached, in chunks of positions: [B, T]."""
    return per_position(_entropy, logits_BTV.detach())


def high_entropy_rate(entropy_BT: torch.Tensor, mask_BT: torch.Tensor, threshold: float = 0.8) -> float:
    """Fraction of masked tokens whose entropy exceeds ``threshold`` nats (ALGORITHMS.md §13.1; 0.8 = EOPD's
    gate). Vanilla OPD was reported to keep 6.8% such tokens against the teacher's 18.5%."""
    mask_BT = mask_BT.bool()
    return float((entropy_BT[mask_BT] > threshold).float().mean()) if mask_BT.any() else 0.0


def log_ratio_stats(log_ratio_BT: torch.Tensor, mask_BT: torch.Tensor) -> dict[str, float]:
    """Training-health numbers of the sampled log-ratio ℓ = log p_S(y) - log p_T(y) (ALGORITHMS.md §13.6):
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
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021; ALGORITHMS.md §13.2, I11):
    1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def topk_overlap(student_ids_BTK: torch.Tensor, teacher_ids_BTK: torch.Tensor) -> torch.Tensor:
    """overlap@K = |TopK_S ∩ TopK_T| / K at every position (ALGORITHMS.md §8.2, §13.3; Prune-OPD's local
    compatibility signal, Yang et al. 2026): the share of the student's top-K ids that are also the teacher's.
    Both id sets are assumed duplicate-free; K is the last dim. Shapes: [B, T, K] int ×2 → [B, T] float."""
    if student_ids_BTK.shape != teacher_ids_BTK.shape:
        raise ValueError(
            f"top-k id shapes differ: {tuple(student_ids_BTK.shape)} vs {tuple(teacher_ids_BTK.shape)}"
        )
    shared_BTKK = student_ids_BTK.unsqueeze(-1) == teacher_ids_BTK.unsqueeze(-2)
    return shared_BTKK.any(-1).sum(-1) / student_ids_BTK.shape[-1]
