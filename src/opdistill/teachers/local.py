"""A teacher in this process: one forward over prompt ⊕ completion per rollout, scored a chunk of positions
at a time, and OPSD's EMA update."""

from __future__ import annotations

import torch

from opdistill.logits import CHUNK_TOKENS, CompletionLogits, reduce_chunks
from opdistill.objectives.losses import logprobs_at, token_logprobs, topk_logprobs
from opdistill.observe.diagnostics import token_entropy
from opdistill.types import Rollout, SignalRequest, TeacherSignal


class LocalTeacher:
    """An HF model in this process; one forward over prompt ⊕ completion per rollout for the scores it
    returns (a teacher's full logits, when the batch is more than one chunk, are made again per loss
    micro-batch, and by the diagnostics and TIP that read them). It is frozen, unless it is the student
    itself (``frozen=False``: OPSD's live self-teacher scores with the current weights). Its logits exist
    ``chunk_tokens`` positions at a time (logits.py)."""

    def __init__(self, model, frozen: bool = True, chunk_tokens: int = CHUNK_TOKENS):
        self.model = model.eval().requires_grad_(False) if frozen else model
        self.chunk_tokens = chunk_tokens

    def score(
        self, rollout: Rollout, request: SignalRequest, ids_BTK: torch.Tensor | None = None
    ) -> TeacherSignal:
        """L0 always; L1 top-K, L1s log-probs at ``ids_BTK``, the entropy when ``request`` asks, each reduced
        chunk by chunk. L2 (full logits) is handed over unmade (``CompletionLogits``: each loss micro-batch
        makes its rows'), unless the batch is one chunk, whose logits are kept: then the teacher's one forward
        serves every level. Derived values are ordinary tensors, which the loss may save for its backward."""
        if request.at_ids and ids_BTK is None:
            raise ValueError("the request asks for log-probs at given ids (L1s) but no ids were given")
        B, T = rollout.tokens_BT.shape
        logits = CompletionLogits(self.model, rollout)
        if request.full and self.chunk_tokens >= B * T:
            logits.tensor()  # one chunk: made now, kept for the loss

        def reduce(rows: slice, positions: slice, logits_btV: torch.Tensor) -> dict[str, torch.Tensor]:
            at_btK = None if ids_BTK is None or not request.at_ids else ids_BTK[rows, positions]
            topk = min(request.topk, logits_btV.shape[-1])  # diagnostics ask for objective.topk on any vocab
            return scores(logits_btV, rollout.tokens_BT[rows, positions], topk, at_btK, request.entropy)

        with torch.no_grad():
            out = reduce_chunks(logits.chunks(self.chunk_tokens), (B, T), reduce)
        mask_BT = rollout.loss_mask_BT
        return TeacherSignal(
            token_logp_BT=out["token_logp"] * mask_BT,
            topk_ids_BTK=out.get("topk_ids"),
            topk_logp_BTK=out.get("topk_logp"),
            given_ids_BTK=ids_BTK if request.at_ids else None,
            given_logp_BTK=out.get("given_logp"),
            entropy_BT=out["entropy"] * mask_BT if request.entropy else None,
            full_logits=logits if request.full else None,
        )


def scores(
    logits_btV: torch.Tensor, tokens_bt: torch.Tensor, topk: int, ids_btK: torch.Tensor | None, entropy: bool
) -> dict[str, torch.Tensor]:
    """A teacher's per-position scores from one chunk of its logits: the sampled token's log-prob, and as
    asked its top-``topk`` ids and log-probs, its log-probs at ``ids_btK``, its entropy."""
    out = {"token_logp": token_logprobs(logits_btV, tokens_bt)}
    if topk:
        out["topk_ids"], out["topk_logp"] = topk_logprobs(logits_btV, topk)
    if ids_btK is not None:
        out["given_logp"] = logprobs_at(logits_btV, ids_btK)
    if entropy:
        out["entropy"] = token_entropy(logits_btV)
    return out


@torch.no_grad()
def ema_update(teacher, student, decay: float) -> None:
    """OPSD's EMA self-teacher: every weight becomes ``decay x teacher + (1 - decay) x student``."""
    for mine, theirs in zip(teacher.parameters(), student.parameters(), strict=True):  # tied weights once
        mine.lerp_(theirs.to(mine.dtype), 1 - decay)
