"""One decode step at a time for the sampler: HF's own forward with its KV cache, or — for the decoder-only
architectures whose math is plain (Llama, Qwen2, Qwen3) — a lean step over the same weights with a
preallocated cache.

Why: a small model's decode step is dominated by the Python around the tensor work (HF builds masks, cache
objects and module calls per layer per token): about 1 ms per token for the built-in 34k-parameter model,
half of a training step. The lean step runs the same operations (RMSNorm, rotary embedding from the model's
own ``rotary_emb``, grouped-query SDPA, SwiGLU, tied or untied head) as a flat list of tensor calls; its
logits equal HF's to float tolerance (tests/test_decode.py). Anything else — other architectures, LoRA
(PEFT) layers, FSDP-sharded weights, biased MLPs, sliding windows — takes the HF path.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

LEAN_TYPES = ("llama", "qwen2", "qwen3")


class HFDecoder:
    """The model's own forward, one token per call, with HF's KV cache."""

    def __init__(self, model):
        self.model, self.past = model, None

    def prefill(self, ids_BP, attention_BP, position_BP, max_len: int) -> torch.Tensor:
        out = self.model(input_ids=ids_BP, attention_mask=attention_BP, position_ids=position_BP,
                         use_cache=True, logits_to_keep=1)  # fmt: skip
        self.past = out.past_key_values
        return out.logits[:, -1]

    def step(self, token_B, attention_BL, position_B1) -> torch.Tensor:
        out = self.model(input_ids=token_B[:, None], attention_mask=attention_BL, position_ids=position_B1,
                         past_key_values=self.past, use_cache=True)  # fmt: skip
        self.past = out.past_key_values
        return out.logits[:, -1]


class Block(NamedTuple):
    """One decoder layer's weights, as the lean step reads them."""

    norm_in: torch.Tensor
    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None
    wv: torch.Tensor
    bv: torch.Tensor | None
    wo: torch.Tensor
    q_norm: torch.Tensor | None  # Qwen3's per-head norms
    k_norm: torch.Tensor | None
    norm_post: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @classmethod
    def of(cls, layer) -> Block:
        attn, mlp = layer.self_attn, layer.mlp
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return cls(
            layer.input_layernorm.weight, attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight,
            attn.k_proj.bias, attn.v_proj.weight, attn.v_proj.bias, attn.o_proj.weight,
            None if q_norm is None else q_norm.weight, None if k_norm is None else k_norm.weight,
            layer.post_attention_layernorm.weight, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
        )  # fmt: skip


class LeanDecoder:
    """The decode step of a Llama / Qwen2 / Qwen3 model as flat tensor calls over its weights, with a cache
    preallocated for the whole rollout. The prompt goes through HF's forward once (its cache is copied in)."""

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
            linears += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                        mlp.down_proj]  # fmt: skip
            if getattr(attn, "sliding_window", None) or type(mlp.act_fn).__name__ != "SiLUActivation":
                return False
        # plain nn.Linear only (not PEFT's LoRA layers), with whole tensors (FSDP2 shards into DTensors and
        # gathers them in module hooks, which a lean step would bypass)
        return all(type(m) is torch.nn.Linear and not isinstance(m.weight, DTensor) for m in linears)

    def prefill(self, ids_BP, attention_BP, position_BP, max_len: int) -> torch.Tensor:
        out = self.model(input_ids=ids_BP, attention_mask=attention_BP, position_ids=position_BP,
                         use_cache=True, logits_to_keep=1)  # fmt: skip
        B, P = ids_BP.shape
        self.length = P
        self.keys, self.values = [], []
        for layer in out.past_key_values.layers:
            keys = layer.keys.new_zeros(B, self.kv_heads, max_len, self.head_dim)
            values = torch.zeros_like(keys)
            keys[:, :, :P], values[:, :, :P] = layer.keys, layer.values
            self.keys.append(keys)
            self.values.append(values)
        positions = torch.arange(max_len, device=ids_BP.device)[None]
        self.cos, self.sin = self.rotary(self.embed[:1][None], positions)  # [1, max_len, D] each
        return out.logits[:, -1]

    def step(self, token_B, attention_BL, position_B1) -> torch.Tensor:
        B, L = attention_BL.shape
        h = F.embedding(token_B[:, None], self.embed)  # [B, 1, H]
        cos, sin = self.cos[0, position_B1][:, None], self.sin[0, position_B1][:, None]  # [B, 1, 1, D]
        mask_B11L = attention_BL.bool()[:, None, None]
        at = self.length
        for b, keys, values in zip(self.blocks, self.keys, self.values, strict=True):
            x = self._rms(h, b.norm_in)
            q = F.linear(x, b.wq, b.bq).view(B, 1, self.heads, self.head_dim)
            k = F.linear(x, b.wk, b.bk).view(B, 1, self.kv_heads, self.head_dim)
            if b.q_norm is not None and b.k_norm is not None:  # Qwen3
                q, k = self._rms(q, b.q_norm), self._rms(k, b.k_norm)
            q, k = self._rotate(q.transpose(1, 2), cos, sin), self._rotate(k.transpose(1, 2), cos, sin)
            keys[:, :, at : at + 1] = k
            values[:, :, at : at + 1] = (
                F.linear(x, b.wv, b.bv).view(B, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            )
            attended = F.scaled_dot_product_attention(
                q, keys[:, :, :L], values[:, :, :L], attn_mask=mask_B11L, scale=self.scaling,
                enable_gqa=self.kv_heads != self.heads,
            )  # fmt: skip
            h = h + F.linear(attended.transpose(1, 2).reshape(B, 1, -1), b.wo)
            x = self._rms(h, b.norm_post)
            h = h + F.linear(F.silu(F.linear(x, b.gate)) * F.linear(x, b.up), b.down)
        self.length = at + 1
        return F.linear(self._rms(h, self.final_norm), self.head_weight, self.head_bias)[:, -1]

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """HF's RMSNorm: normalised in fp32, cast back, then scaled."""
        return weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


def decoder_for(model, lean: bool = True) -> HFDecoder | LeanDecoder:
    """The lean decoder when it computes exactly what ``model`` does (and ``lean``), else HF's."""
    return LeanDecoder(model) if lean and LeanDecoder.supports(model) else HFDecoder(model)
