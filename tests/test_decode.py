"""The lean decode step computes what the HF forward computes, and steps aside when it would not."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from opdistill.config import LoraConfig
from opdistill.data.examples import left_pad
from opdistill.models import apply_lora
from opdistill.sampling import decode
from opdistill.sampling import rollout as rollout_module
from opdistill.sampling.decode import HFDecoder, LeanDecoder, decoder_for
from opdistill.sampling.rollout import sample_prompts

SIZES = dict(
    vocab_size=18,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
)


def _model(arch: str, **extra):
    """Tiny models of each lean architecture: grouped-query attention (2 KV heads for 4), Qwen2's q/k/v
    biases, Llama's attention biases (q/k/v and output), Qwen3's per-head q/k norms, untied and tied heads."""
    torch.manual_seed(0)
    cls, config = {
        "llama": (LlamaForCausalLM, LlamaConfig(**SIZES, num_key_value_heads=2, tie_word_embeddings=False)),
        "llama-biased": (LlamaForCausalLM, LlamaConfig(**SIZES, num_key_value_heads=2, attention_bias=True)),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SIZES, num_key_value_heads=2, tie_word_embeddings=True)),
        "qwen3": (Qwen3ForCausalLM, Qwen3Config(**SIZES, num_key_value_heads=2, head_dim=8, **extra)),
    }[arch]
    model = cls(config).eval()
    with torch.no_grad():  # untrained norms are all ones: make them matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def _steps(decoder, ids_BP, mask_BP, tokens_TB) -> torch.Tensor:
    attention = mask_BP.long()
    position = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = [decoder.prefill(ids_BP, attention, position, ids_BP.shape[1] + len(tokens_TB))]
    position = position[:, -1:]
    for token_B in tokens_TB:
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        position = position + 1
        logits.append(decoder.step(token_B, attention, position))
    return torch.stack(logits)


@pytest.mark.parametrize("arch", ["llama", "llama-biased", "qwen2", "qwen3"])
def test_lean_steps_give_the_hf_logits(arch):
    model = _model(arch)
    assert LeanDecoder.supports(model)
    ids_BP, mask_BP = left_pad([[1, 5, 6, 7, 8, 9], [1, 9], [1, 4, 4, 4]], pad_id=0)
    tokens_TB = torch.randint(3, 18, (24, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _steps(HFDecoder(model), ids_BP, mask_BP, tokens_TB)
        got = _steps(LeanDecoder(model), ids_BP, mask_BP, tokens_TB)
    assert expected.std() > 0.1  # logits that move with the input, so a wrong step would show
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sampling_is_the_same_with_either_decoder(make_model, tokenizer, monkeypatch):
    model = make_model(seed=3, preset="d32l2")
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in ("12+34=", "5+6=", "123+4=")] * 2

    def sample():
        return sample_prompts(
            model,
            tokenizer,
            prompts,
            max_new_tokens=20,
            temperature=1.0,
            generator=torch.Generator().manual_seed(0),
        )

    lean = sample()
    monkeypatch.setattr(rollout_module, "decoder_for", lambda m: decoder_for(m, lean=False))
    hf = sample()
    assert torch.equal(lean.tokens_BT, hf.tokens_BT) and lean.tokens_BT.shape[1] > 5
    torch.testing.assert_close(lean.sampler_logp_BT, hf.sampler_logp_BT)


def test_models_the_lean_step_does_not_cover_take_the_hf_path(make_model, monkeypatch):
    assert isinstance(decoder_for(make_model()), LeanDecoder)
    lora = apply_lora(make_model(), LoraConfig(rank=4))
    assert not LeanDecoder.supports(lora) and isinstance(decoder_for(lora), HFDecoder)
    sliding = Qwen2ForCausalLM(
        Qwen2Config(**SIZES, num_key_value_heads=2, use_sliding_window=True, sliding_window=4)
    )
    assert not LeanDecoder.supports(sliding)
    assert not LeanDecoder.supports(torch.nn.Linear(2, 2))
    small = make_model()
    monkeypatch.setattr(decode, "LEAN_MAX_PARAMETERS", sum(p.numel() for p in small.parameters()) - 1)
    assert isinstance(decoder_for(small), HFDecoder)  # its stacked weights would cost more than they save
