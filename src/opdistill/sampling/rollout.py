"""Sampling: a pure ``sample_next_token`` and KV-cached batched generation with per-sequence EOS."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from opdistill.data.examples import left_pad
from opdistill.data.rendering import end_ids
from opdistill.sampling.decode import decoder_for, sharded
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
    logits_BV = logits_BV.float()
    logp_BV = torch.log_softmax(logits_BV if temperature == 1 else logits_BV / temperature, dim=-1)
    if top_p < 1.0:
        sorted_logp, order = logp_BV.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()
        sorted_logp = sorted_logp.masked_fill(mass_before >= top_p, float("-inf"))
        logp_BV = torch.full_like(logp_BV, float("-inf")).scatter(-1, order, sorted_logp)
        logp_BV = torch.log_softmax(logp_BV, dim=-1)
    cdf_BV = logp_BV.exp().cumsum(-1)
    # the first id whose CDF exceeds u: ids of zero probability have empty intervals and are never drawn
    point_B1 = uniform_B.to(cdf_BV)[:, None] * cdf_BV[:, -1:]
    token_B = torch.searchsorted(cdf_BV, point_B1, right=True).squeeze(-1).clamp(max=cdf_BV.shape[-1] - 1)
    return token_B, logp_BV.gather(-1, token_B[:, None]).squeeze(-1)


class Guide(Protocol):
    """Steers ``generate`` token by token, e.g. SKD's teacher that verifies the student's proposals
    (speculative.py). ``generate`` calls ``start`` once, after the student's prefill, with the left-padded
    prompts, their attention mask and position ids, the ``rows = (first, total)`` it samples and the longest
    sequence the rollout can reach (prompt + max_new_tokens, for a preallocated cache); then, at every
    step, ``choose`` with the student's draw and the mask of rows that have already ended (their token becomes
    pad whatever is chosen), which returns the final tokens and their log-probs under the distribution each
    was drawn from; before the student's next forward, ``advance`` with the final tokens and the attention
    mask and position ids of that forward, so a guide with its own model sees exactly the student's prefix;
    and ``finish`` once the last token is drawn, to free what it held for this rollout (a KV cache)."""

    def start(
        self,
        prompt_ids_BP: torch.Tensor,
        attention_BP: torch.Tensor,
        position_BP: torch.Tensor,
        rows: tuple[int, int],
        max_len: int,
    ) -> None: ...

    def choose(
        self, token_B: torch.Tensor, logp_B: torch.Tensor, done_B: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def advance(
        self, token_B: torch.Tensor, attention_BL: torch.Tensor, position_B1: torch.Tensor
    ) -> None: ...

    def finish(self) -> None: ...


class StudentOnly:
    """The default guide: every student token is kept (plain on-policy sampling)."""

    def start(self, prompt_ids_BP, attention_BP, position_BP, rows, max_len) -> None:
        pass

    def choose(self, token_B, logp_B, done_B) -> tuple[torch.Tensor, torch.Tensor]:
        return token_B, logp_B

    def advance(self, token_B, attention_BL, position_B1) -> None:
        pass

    def finish(self) -> None:
        pass


@torch.no_grad()
def generate(
    model,
    prompt_ids_BP: torch.Tensor,
    prompt_mask_BP: torch.Tensor,
    *,
    max_new_tokens: int,
    end_ids: Sequence[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    rows: tuple[int, int] | None = None,
    all_finished: Callable[[bool], bool] = bool,
    guide: Guide | None = None,
) -> Rollout:
    """Sample completions for left-padded prompts, one new token per decode step over a KV cache (decode.py:
    the lean step where it computes what the model does, else the model's own forward).

    A row stops at its first end token (any of ``end_ids``: EOS, a chat template's end of turn), which is
    kept and receives loss; the batch stops when every row has.
    ``rows = (first, total)`` says these are rows first.. of a batch of ``total`` split across ranks: each
    token step draws ``total`` uniforms and uses this batch's slice, so a row's sample is the same for any
    split (world size) of the batch. ``all_finished`` turns "every row here has ended" into "every rank's
    have": the ranks of an FSDP2-sharded model must run the same number of forwards. ``guide`` may replace
    each token the model draws (see ``Guide``); ``sampler_logp_BT`` then holds the log-prob under whichever
    distribution the kept token came from.
    """
    B, device = prompt_ids_BP.shape[0], prompt_ids_BP.device
    first, total = rows or (0, B)
    guide = guide or StudentOnly()
    # the loop runs in inference mode (less bookkeeping per call than no_grad); its results are stacked below,
    # outside it, into ordinary tensors, which the student's forward may save for its backward. Not for FSDP2:
    # it gathers weights into buffers that it updates again outside inference mode, which that forbids.
    with torch.inference_mode(not sharded(model)):
        P = prompt_ids_BP.shape[1]
        decoder, max_len = decoder_for(model), P + max_new_tokens
        # the attention mask of every forward is a prefix of this one: sampled positions are always attended
        attention_BM = torch.cat(
            [prompt_mask_BP.long(), prompt_mask_BP.new_ones(B, max_new_tokens, dtype=torch.long)], 1
        )
        attention_BL = attention_BM[:, :P]
        position_BP = (attention_BL.cumsum(-1) - 1).clamp(min=0)
        logits_BV = decoder.prefill(prompt_ids_BP, attention_BL, position_BP, max_len)
        guide.start(prompt_ids_BP, attention_BL, position_BP, (first, total), max_len)
        position_B1 = position_BP[:, -1:]
        tokens, logps = [], []
        done_B = torch.zeros(B, dtype=torch.bool, device=device)
        end_E = torch.tensor(list(end_ids), dtype=torch.long, device=device)
        for step in range(max_new_tokens):
            uniform_B = torch.rand(total, generator=generator)[first : first + B]
            token_B, logp_B = sample_next_token(logits_BV, temperature, top_p, uniform_B.to(device))
            token_B, logp_B = guide.choose(token_B, logp_B, done_B)
            token_B = token_B.masked_fill(done_B, pad_id)
            tokens.append(token_B)
            logps.append(logp_B.masked_fill(done_B, 0.0))
            done_B = done_B | torch.isin(token_B, end_E)
            # no forward for an unused token
            if all_finished(bool(done_B.all())) or step == max_new_tokens - 1:
                break
            attention_BL = attention_BM[:, : P + step + 1]
            position_B1 = position_B1 + 1
            logits_BV = decoder.step(token_B, attention_BL, position_B1)
            guide.advance(token_B, attention_BL, position_B1)
        guide.finish()
    tokens_BT = torch.stack(tokens, dim=1)
    # a token receives loss if it was generated before (or is) the row's first end token
    is_end_BT = torch.isin(tokens_BT, end_E)
    loss_mask_BT = (is_end_BT.cumsum(1) - is_end_BT.long()) == 0
    return Rollout(
        prompt_ids_BP=prompt_ids_BP,
        prompt_mask_BP=prompt_mask_BP,
        tokens_BT=tokens_BT,
        loss_mask_BT=loss_mask_BT,
        sampler_logp_BT=torch.stack(logps, dim=1).float(),
        truncated_B=~is_end_BT.any(1),
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
    guide: Guide | None = None,
) -> Rollout:
    """Left-pad token-id prompts and ``generate`` with the model in eval mode (its mode is restored after), on
    the model's device."""
    device = next(model.parameters()).device
    ids_BP, mask_BP = (t.to(device) for t in left_pad(prompt_ids, tokenizer.pad_token_id))
    was_training = model.training
    model.eval()
    try:
        return generate(
            model,
            ids_BP,
            mask_BP,
            max_new_tokens=max_new_tokens,
            end_ids=end_ids(tokenizer),
            pad_id=tokenizer.pad_token_id,
            temperature=temperature,
            top_p=top_p,
            generator=generator,
            rows=rows,
            all_finished=all_finished,
            guide=guide,
        )
    finally:
        model.train(was_training)
