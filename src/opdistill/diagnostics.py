"""Pure diagnostics (ALGORITHMS.md §13): entropies, pass@k. Tensors and numbers in, numbers out."""

from __future__ import annotations

import math

import torch

from opdistill.losses import at_least_fp32


def mean_entropy(logits_BTV: torch.Tensor, mask_BT: torch.Tensor) -> float:
    """Mean over masked positions of H(softmax(logits)) in nats."""
    logp_BTV = torch.log_softmax(at_least_fp32(logits_BTV.detach()), dim=-1)
    entropy_BT = -(logp_BTV.exp() * logp_BTV).nan_to_num().sum(-1)
    mask_BT = mask_BT.float()
    return float((entropy_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021; ALGORITHMS.md §13.2, I11):
    1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
