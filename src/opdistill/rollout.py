"""Sampling: a pure ``sample_next_token`` and KV-cached batched generation with per-sequence EOS."""

from __future__ import annotations

import torch

from opdistill.data import left_pad
from opdistill.types import Rollout


def sample_next_token(
    logits_BV: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row. Returns (token_B, logp_B): logp under the distribution actually sampled
    from (tempered and nucleus-renormalised), which is the behaviour policy importance sampling needs.
    temperature == 0 is greedy (logp 0: the choice is deterministic)."""
    if temperature == 0:
        return logits_BV.argmax(-1), torch.zeros(logits_BV.shape[0])
    logp_BV = torch.log_softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_logp, order = logp_BV.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()
        sorted_logp = sorted_logp.masked_fill(mass_before >= top_p, float("-inf"))
        logp_BV = torch.full_like(logp_BV, float("-inf")).scatter(-1, order, sorted_logp)
        logp_BV = torch.log_softmax(logp_BV, dim=-1)
    token_B = torch.multinomial(logp_BV.exp(), 1, generator=generator).squeeze(-1)
    return token_B, logp_BV.gather(-1, token_B[:, None]).squeeze(-1)


@torch.no_grad()  # not inference_mode: the sampled tokens later enter the student's autograd graph
def generate(
    model,
    prompt_ids_BP: torch.Tensor,
    prompt_mask_BP: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample completions for left-padded prompts, one new token per forward thanks to the KV cache.

    A row stops at its first EOS (which is kept and receives loss); the batch stops when every row has.
    """
    B = prompt_ids_BP.shape[0]
    attention_BL = prompt_mask_BP.long()
    position_B1 = (attention_BL.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=prompt_ids_BP,
        attention_mask=attention_BL,
        position_ids=position_B1,
        use_cache=True,
        logits_to_keep=1,
    )
    position_B1 = position_B1[:, -1:]
    tokens, logps = [], []
    done_B = torch.zeros(B, dtype=torch.bool)
    for _ in range(max_new_tokens):
        token_B, logp_B = sample_next_token(out.logits[:, -1], temperature, top_p, generator)
        token_B = token_B.masked_fill(done_B, pad_id)
        tokens.append(token_B)
        logps.append(logp_B.masked_fill(done_B, 0.0))
        done_B = done_B | (token_B == eos_id)
        if bool(done_B.all()):
            break
        attention_BL = torch.cat([attention_BL, torch.ones(B, 1, dtype=torch.long)], dim=1)
        position_B1 = position_B1 + 1
        out = model(
            input_ids=token_B[:, None],
            attention_mask=attention_BL,
            position_ids=position_B1,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    tokens_BT = torch.stack(tokens, dim=1)
    # a token receives loss if it was generated before (or is) the row's first EOS
    is_eos_BT = tokens_BT == eos_id
    after_eos_BT = (is_eos_BT.cumsum(1) - is_eos_BT.long()) > 0
    loss_mask_BT = ~after_eos_BT
    return Rollout(
        prompt_ids_BP=prompt_ids_BP,
        prompt_mask_BP=prompt_mask_BP,
        tokens_BT=tokens_BT,
        loss_mask_BT=loss_mask_BT,
        sampler_logp_BT=torch.stack(logps, dim=1).float(),
        truncated_B=~is_eos_BT.any(1),
    )


def sample_prompts(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Left-pad token-id prompts and ``generate`` with the model in eval mode (its mode is restored after)."""
    ids_BP, mask_BP = left_pad(prompt_ids, tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    try:
        return generate(
            model, ids_BP, mask_BP, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p, generator=generator,
        )  # fmt: skip
    finally:
        model.train(was_training)
