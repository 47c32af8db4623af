"""Sampling: a pure ``sample_next_token`` and KV-cached batched generation with per-sequence EOS."""

from __future__ import annotations

from collections.abc import Callable

import torch

from opdistill.data import left_pad
from opdistill.types import Rollout


def sample_next_token(
    logits_BV: torch.Tensor, temperature: float, top_p: float, uniform_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row by inverting its CDF at ``uniform_B`` (values in [0, 1)). Returns (token_B,
    logp_B): logp under the distribution actually sampled from (tempered and nucleus-renormalised), which is
    the behaviour policy importance sampling needs. temperature == 0 is greedy (logp 0: the choice is
    deterministic). A row's token depends on its own logits and uniform only, not on the rest of the batch."""
    if temperature == 0:
        return logits_BV.argmax(-1), torch.zeros(logits_BV.shape[0], device=logits_BV.device)
    logp_BV = torch.log_softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_logp, order = logp_BV.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()
        sorted_logp = sorted_logp.masked_fill(mass_before >= top_p, float("-inf"))
        logp_BV = torch.full_like(logp_BV, float("-inf")).scatter(-1, order, sorted_logp)
        logp_BV = torch.log_softmax(logp_BV, dim=-1)
    cdf_BV = logp_BV.exp().cumsum(-1)
    # the first id whose CDF exceeds u: ids of zero probability have empty intervals and are never drawn
    point_B1 = (uniform_B.to(cdf_BV) * cdf_BV[:, -1])[:, None]
    token_B = torch.searchsorted(cdf_BV, point_B1, right=True).squeeze(-1).clamp(max=cdf_BV.shape[-1] - 1)
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
    rows: tuple[int, int] | None = None,
    all_finished: Callable[[bool], bool] = bool,
) -> Rollout:
    """Sample completions for left-padded prompts, one new token per forward thanks to the KV cache.

    A row stops at its first EOS (which is kept and receives loss); the batch stops when every row has.
    ``rows = (first, total)`` says these are rows first.. of a batch of ``total`` split across ranks: each
    token step draws ``total`` uniforms and uses this batch's slice, so a row's sample is the same for any
    split (world size) of the batch. ``all_finished`` turns "every row here has ended" into "every rank's
    have": the ranks of an FSDP2-sharded model must run the same number of forwards.
    """
    B, device = prompt_ids_BP.shape[0], prompt_ids_BP.device
    first, total = rows or (0, B)
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
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        uniform_B = torch.rand(total, generator=generator)[first : first + B]
        token_B, logp_B = sample_next_token(out.logits[:, -1], temperature, top_p, uniform_B.to(device))
        token_B = token_B.masked_fill(done_B, pad_id)
        tokens.append(token_B)
        logps.append(logp_B.masked_fill(done_B, 0.0))
        done_B = done_B | (token_B == eos_id)
        if all_finished(bool(done_B.all())) or step == max_new_tokens - 1:  # no forward for an unused token
            break
        attention_BL = torch.cat([attention_BL, torch.ones(B, 1, dtype=torch.long, device=device)], dim=1)
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
    rows: tuple[int, int] | None = None,
    all_finished: Callable[[bool], bool] = bool,
) -> Rollout:
    """Left-pad token-id prompts and ``generate`` with the model in eval mode (its mode is restored after), on
    the model's device."""
    device = next(model.parameters()).device
    ids_BP, mask_BP = (t.to(device) for t in left_pad(prompt_ids, tokenizer.pad_token_id))
    was_training = model.training
    model.eval()
    try:
        return generate(
            model, ids_BP, mask_BP, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p, generator=generator, rows=rows, all_finished=all_finished,
        )  # fmt: skip
    finally:
        model.train(was_training)
