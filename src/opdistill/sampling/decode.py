"""One decode step at a time for the sampler: HF's own forward with its KV cache, or — for the decoder-only
architectures whose math is plain (Llama, Qwen2, Qwen3) — a lean step over the same weights with a
preallocated cache.

Why: a small model's decode step is dominated by the Python around the tensor work (HF builds masks, cache
objects and module calls per layer per token): about 1 ms per token for the built-in 34k-parameter model,
half of a training step. The lean step runs the same operations (RMSNorm, rotary embedding from the model's
own ``rotary_emb``, grouped-query attention, SwiGLU, tied or untied head) as a flat list of tensor calls,
with q/k/v and gate/up each one matmul over weights stacked once per rollout, and attention as two batched
matmuls against the cache; its logits equal HF's to float tolerance (tests/test_decode.py). Anything else —
other architectures, LoRA (PEFT) layers, FSDP-sharded weights, biased MLPs, sliding windows, models over
``LEAN_MAX_PARAMETERS`` — takes the HF path.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

LEAN_TYPES = ("llama", "qwen2", "qwen3")
# the lean step's stacked weight copies cost memory; beyond this size a decode step is compute-bound and the
# Python it saves no longer matters
LEAN_MAX_PARAMETERS = 200_000_000


class HFDecoder:
    """The model's own forward, one token per call, with HF's KV cache."""

    def __init__(self, model):
        self.model, self.past = model, None

    def prefill(self, ids_BP, attention_BP, position_BP, max_len: int) -> torch.Tensor:
        out = self.model(
            input_ids=ids_BP,
            attention_mask=attention_BP,
            position_ids=position_BP,
            use_cache=True,
            logits_to_keep=1,
        )
        self.past = out.past_key_values
        return out.logits[:, -1]

    def step(self, token_B, attention_BL, position_B1) -> torch.Tensor:
        out = self.model(
            input_ids=token_B[:, None],
            attention_mask=attention_BL,
            position_ids=position_B1,
            past_key_values=self.past,
            use_cache=True,
        )
        self.past = out.past_key_values
        return out.logits[:, -1]


class Block(NamedTuple):
    """One decoder layer's weights as the lean step reads them. The q, k and v projections are stacked into
    one matrix and gate and up into another, so each is one matmul per step: copies, made once per rollout."""

    norm_in: torch.Tensor
    qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None  # Qwen2's
    wo: torch.Tensor
    wo_bias: torch.Tensor | None  # Llama's attention_bias
    q_norm: torch.Tensor | None  # Qwen3's per-head norms
    k_norm: torch.Tensor | None
    norm_post: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor

    @classmethod
    def of(cls, layer) -> Block:
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        biased = attn.q_proj.bias is not None
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return cls(
            layer.input_layernorm.weight,
            torch.cat([p.weight for p in projections]),
            torch.cat([p.bias for p in projections]) if biased else None,
            attn.o_proj.weight,
            attn.o_proj.bias,
            None if q_norm is None else q_norm.weight,
            None if k_norm is None else k_norm.weight,
            layer.post_attention_layernorm.weight,
            torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
            mlp.down_proj.weight,
        )


class LeanDecoder:
    """The decode step of a Llama / Qwen2 / Qwen3 model as flat tensor calls over its weights, with a cache
    preallocated for the whole rollout; the prompt takes the same path, all its tokens at once."""

    def __init__(self, model):
        self.model = model
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.eps = config.rms_norm_eps
        body = model.model
        self.embed = body.embed_tokens.weight
        self.final_norm = body.norm.weight
        self.head_weight, self.head_bias = model.lm_head.weight, model.lm_head.bias
        self.blocks = [Block.of(layer) for layer in body.layers]
        self.head_dim, self.scaling = body.layers[0].self_attn.head_dim, body.layers[0].self_attn.scaling
        self.rotary = body.rotary_emb

    @staticmethod
    def supports(model) -> bool:
        """Whether the lean step computes exactly what ``model``'s forward computes."""
        if not isinstance(model, PreTrainedModel):  # e.g. PEFT's wrapper, or a module around a model
            return False
        if sum(p.numel() for p in model.parameters()) > LEAN_MAX_PARAMETERS:
            return False
        config, layers = model.config, getattr(getattr(model, "model", None), "layers", None)
        if getattr(config, "model_type", "") not in LEAN_TYPES or not isinstance(layers, torch.nn.ModuleList):
            return False
        if getattr(config, "hidden_act", "") != "silu" or getattr(config, "pretraining_tp", 1) != 1:
            return False
        if getattr(config, "use_sliding_window", False) or getattr(config, "mlp_bias", False):
            return False
        linears, blocks = [model.lm_head], cast(list[Any], list(layers))
        for layer in blocks:
            attn, mlp = layer.self_attn, layer.mlp
            linears += [
                attn.q_proj,
                attn.k_proj,
                attn.v_proj,
                attn.o_proj,
                mlp.gate_proj,
                mlp.up_proj,
                mlp.down_proj,
            ]
            if getattr(attn, "sliding_window", None) or type(mlp.act_fn).__name__ != "SiLUActivation":
                return False
        # plain nn.Linear only (not PEFT's LoRA layers), with whole tensors (FSDP2 shards into DTensors and
        # gathers them in module hooks, which a lean step would bypass)
        return all(type(m) is torch.nn.Linear for m in linears) and not sharded(model)

    def prefill(self, ids_BP, attention_BP, position_BP, max_len: int) -> torch.Tensor:
        B, P = ids_BP.shape
        kv_heads, D, groups = self.kv_heads, self.head_dim, self.heads // self.kv_heads
        # per layer, keys and values as [N = B * kv_heads, max_len, D]: one batched matmul attends every row's
        # query heads (grouped by their key/value head) to the cache
        self.keys = [self.embed.new_zeros(B * kv_heads, max_len, D) for _ in self.blocks]
        self.values = [torch.zeros_like(keys) for keys in self.keys]
        self.length = 0
        positions = torch.arange(max_len, device=ids_BP.device)[None]
        cos, sin = self.rotary(self.embed[:1][None], positions)  # [1, max_len, D] each
        # rotate_half(x) = roll(x, D/2) with its first half negated: the sign goes into sin
        sin = torch.cat([-sin[..., : D // 2], sin[..., D // 2 :]], dim=-1)
        self.cos_M1D, self.sin_M1D = cos[0, :, None], sin[0, :, None]
        # the additive mask of every decode step: the prompt's padding is never attended, every sampled
        # position is (generate's attention mask only grows by ones); the prompt's own queries also see no
        # later key
        lowest = torch.finfo(self.embed.dtype).min
        bias_BM = self.embed.new_zeros(B, max_len)
        bias_BM[:, :P].masked_fill_(~attention_BP.bool(), lowest)
        self.bias_N1M = bias_BM.repeat_interleave(kv_heads, dim=0)[:, None]
        later_PP = torch.ones(P, P, dtype=torch.bool, device=ids_BP.device).triu(1)
        bias_NPP = self.bias_N1M[..., :P].masked_fill(later_PP, lowest)
        return self._run(ids_BP, position_BP, bias_NPP.repeat(1, groups, 1))

    def step(self, token_B, attention_BL, position_B1) -> torch.Tensor:
        # attention_BL is all ones past the prompt: the cache's own mask (bias_N1M) already says as much
        return self._run(token_B[:, None], position_B1, self.bias_N1M[..., : self.length + 1])

    def _run(self, ids_BQ, position_BQ, bias_NXL) -> torch.Tensor:
        """Q new tokens per row through every layer, their keys and values into the cache after the ``length``
        already there; the last one's logits. ``bias_NXL`` is the additive mask of the query heads of each
        key/value head against the cache: X = groups x Q rows, or 1 for all."""
        B, Q = ids_BQ.shape
        heads, kv_heads, D = self.heads, self.kv_heads, self.head_dim
        at = self.length
        L = at + Q
        h = F.embedding(ids_BQ.reshape(B * Q), self.embed)  # [B·Q, hidden]: residual adds fold into addmm
        cos, sin = self.cos_M1D[position_BQ], self.sin_M1D[position_BQ]  # [B, Q, 1, D]
        for b, keys, values in zip(self.blocks, self.keys, self.values, strict=True):
            qkv = F.linear(self._rms(h, b.norm_in), b.qkv, b.qkv_bias).view(B, Q, heads + 2 * kv_heads, D)
            qk, v = qkv[:, :, : heads + kv_heads], qkv[:, :, heads + kv_heads :]
            if b.q_norm is not None and b.k_norm is not None:  # Qwen3
                qk = torch.cat(
                    [self._rms(qk[:, :, :heads], b.q_norm), self._rms(qk[:, :, heads:], b.k_norm)], 2
                )
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, -1), sin)  # rotary: sin is rotate-half-signed
            keys.view(B, kv_heads, -1, D)[:, :, at:L] = qk[:, :, heads:].transpose(1, 2)
            values.view(B, kv_heads, -1, D)[:, :, at:L] = v.transpose(1, 2)
            # softmax(q kᵀ · scale + mask) v, the rows of one matmul per key/value head: (group, query) pairs
            q_NXD = qk[:, :, :heads].transpose(1, 2).reshape(B * kv_heads, -1, D)
            scores_NXL = torch.baddbmm(bias_NXL, q_NXD, keys[:, :L].transpose(1, 2), alpha=self.scaling)
            weights_NXL = torch.softmax(scores_NXL, dim=-1, dtype=torch.float32).to(qk.dtype)
            attended = torch.bmm(weights_NXL, values[:, :L]).view(B, heads, Q, D).transpose(1, 2)
            h = torch.addmm(h, attended.reshape(B * Q, heads * D), b.wo.t())
            if b.wo_bias is not None:
                h = h + b.wo_bias
            gate, up = F.linear(self._rms(h, b.norm_post), b.gate_up).chunk(2, dim=-1)
            h = torch.addmm(h, F.silu(gate) * up, b.down.t())
        self.length = L
        return F.linear(self._rms(h.view(B, Q, -1)[:, -1], self.final_norm), self.head_weight, self.head_bias)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """HF's RMSNorm: normalised in fp32, cast back, then scaled (one call when x is fp32)."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, x.shape[-1:], weight, self.eps)
        return weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def sharded(model) -> bool:
    """Whether ``model``'s weights are FSDP2 shards (DTensors), gathered by its module hooks at each
    forward."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def decoder_for(model, lean: bool = True) -> HFDecoder | LeanDecoder:
    """The lean decoder when it computes exactly what ``model`` does (and ``lean``), else HF's."""
    return LeanDecoder(model) if lean and LeanDecoder.supports(model) else HFDecoder(model)
