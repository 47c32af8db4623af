"""Attention for small shapes: explicit math (scaled QKᵀ plus an additive mask, softmax, times V) where the
score tensor is small, PyTorch's SDPA kernels elsewhere. Registered with transformers as ``opd_auto``, the
default ``attention`` of every model opdistill loads (ModelSpec.attention).

Why: on CPU, SDPA's flash kernel costs more than the plain math when a sequence is a few dozen tokens and a
head is 8-16 wide, most of all in the backward pass: for the shipped student (64 sequences of about 53
tokens) a forward + backward takes about a fifth less time with the math (benchmarks/throughput_vs_trl.py
measures the whole step). The math keeps the [B, H, Q, K] scores for the backward pass, which a flash
kernel does not, so it runs only while the mask has at most ``MATH_LIMIT`` entries (B·Q·K) and only on
CPU; larger shapes and other devices keep SDPA (with its ``is_causal`` shortcut when nothing is padded).

transformers builds one mask per forward and hands it to every layer: ``causal_mask`` decides by size
(an additive float mask for the math, SDPA's boolean mask or None otherwise), and ``forward`` follows the
mask's dtype, so every layer of one forward takes the same path.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

NAME = "opd_auto"
MATH_LIMIT = 1 << 18  # mask entries (batch x queries x keys): 64 sequences of 64 tokens
# Heads narrower than one AVX-512 register of fp32: measured on this CPU, a batched [L, L] x [L, D] product
# with D < 16 as the output's last dimension runs several times slower than the same product transposed
# ((bᵀ aᵀ)ᵀ, with L last); from D = 16 on, the plain orientation is as fast or faster.
NARROW = 16


def attend(
    q_BHQD: torch.Tensor, k_BKLD: torch.Tensor, v_BKLD: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(q kᵀ · scale + bias) v per head, [B, H, Q, D]. ``bias`` broadcasts to [B, H, Q, L]: 0 where a
    query may attend, a large negative number where it may not. K key/value heads serve H query heads in
    groups (grouped-query attention). The softmax runs in fp32, as transformers' eager attention does."""
    groups = q_BHQD.shape[1] // k_BKLD.shape[1]
    k_BHLD, v_BHLD = repeat_kv(k_BKLD, groups), repeat_kv(v_BKLD, groups)
    if q_BHQD.shape[-1] < NARROW:
        return _Attention.apply(q_BHQD, k_BHLD, v_BHLD, bias, scale)
    return torch.matmul(_weights(q_BHQD, k_BHLD, bias, scale).to(q_BHQD.dtype), v_BHLD)


def _weights(q_BHQD, k_BHLD, bias, scale) -> torch.Tensor:
    """softmax(q kᵀ · scale + bias) in fp32 at least. The scale goes on q, not on the [B, H, Q, L] scores: the
    same product, on a tensor L/D times smaller."""
    scores = torch.matmul(q_BHQD * scale, k_BHLD.transpose(-1, -2)) + bias
    return torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))


def _wide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b per head, computed as (bᵀ aᵀ)ᵀ, so that the output's last dimension is the long one (L, not
    D)."""
    return torch.matmul(b.transpose(-1, -2), a.transpose(-1, -2)).transpose(-1, -2)


class _Attention(torch.autograd.Function):
    """``attend`` for heads narrower than ``NARROW``, with its backward written out: every product of an
    [L, L] and an [L, D] matrix runs as ``_wide`` (autograd's own backward of the two matmuls runs three of
    its four products with D as the output's last dimension). Gradients equal autograd's to float tolerance
    (tests/test_attention.py). Under bf16 autocast (train.precision=bf16) it runs in fp32: q, k and v can
    arrive in different dtypes there, and its backward runs outside autocast."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, q_BHQD, k_BHLD, v_BHLD, bias, scale):
        weights = _weights(q_BHQD, k_BHLD, bias, scale)  # saved in its fp32, as autograd saves a softmax's
        ctx.save_for_backward(q_BHQD, k_BHLD, v_BHLD, weights)
        ctx.scale = scale
        return _wide(weights.to(q_BHQD.dtype), v_BHLD)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_BHQD):
        q_BHQD, k_BHLD, v_BHLD, weights = ctx.saved_tensors
        dtype = q_BHQD.dtype
        grad_v = _wide(weights.to(dtype).transpose(-1, -2), grad_BHQD)
        grad_weights = torch.matmul(grad_BHQD, v_BHLD.transpose(-1, -2)).to(weights.dtype)
        grad_scores = torch.ops.aten._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
        grad_scores = grad_scores.to(dtype)
        grad_q = _wide(grad_scores, k_BHLD) * ctx.scale
        grad_k = _wide(grad_scores.transpose(-1, -2), q_BHQD * ctx.scale)
        return grad_q, grad_k, grad_v, None, None


def causal_mask(batch_size: int, q_length: int, kv_length: int, **kwargs) -> torch.Tensor | None:
    """transformers' mask function for ``opd_auto``: the eager (additive float) mask where the math runs,
    SDPA's otherwise."""
    device = torch.device(kwargs.get("device", "cpu"))
    if device.type == "cpu" and batch_size * q_length * kv_length <= MATH_LIMIT:
        return eager_mask(batch_size, q_length, kv_length, **kwargs)
    return sdpa_mask(batch_size, q_length, kv_length, **kwargs)


def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention function for ``opd_auto`` ([B, H, Q, D] in, [B, Q, H, D] out)."""
    # a boolean mask or None: the mask function chose SDPA for this size
    if attention_mask is None or not attention_mask.is_floating_point() or (dropout > 0 and module.training):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    return attend(query, key, value, attention_mask, scale).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, forward)
AttentionMaskInterface.register(NAME, causal_mask)
