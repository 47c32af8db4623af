"""A teacher in this process: one forward over prompt ⊕ completion per rollout, and OPSD's EMA update."""

from __future__ import annotations

import torch

from opdistill.models import completion_logits
from opdistill.objectives.losses import logprobs_at, token_logprobs, topk_logprobs
from opdistill.observe.diagnostics import token_entropy
from opdistill.types import Rollout, SignalRequest, TeacherSignal


class LocalTeacher:
    """An HF model in this process; one forward over prompt ⊕ completion per rollout. It is frozen, unless it
    is the student itself (``frozen=False``: OPSD's live self-teacher scores with the current weights)."""

    def __init__(self, model, frozen: bool = True):
        self.model = model.eval().requires_grad_(False) if frozen else model

    @torch.no_grad()
    def score(
        self, rollout: Rollout, request: SignalRequest, ids_BTK: torch.Tensor | None = None
    ) -> TeacherSignal:
        """L0 always; L1 top-K, L1s log-probs at ``ids_BTK``, L2 logits and the entropy when ``request`` asks.
        Nothing of size [B, T, V] is kept unless L2 is asked for. The forward runs in inference mode; what is
        derived from it is computed outside, so the loss may save it for its backward."""
        with torch.inference_mode():
            logits_BTV = completion_logits(self.model, rollout)
        mask_BT = rollout.loss_mask_BT
        signal = TeacherSignal(token_logp_BT=token_logprobs(logits_BTV, rollout.tokens_BT) * mask_BT)
        if request.topk:  # at most the vocabulary (diagnostics ask for objective.topk on any vocabulary)
            signal.topk_ids_BTK, signal.topk_logp_BTK = topk_logprobs(
                logits_BTV, min(request.topk, logits_BTV.shape[-1])
            )
        if request.at_ids:
            if ids_BTK is None:
                raise ValueError("the request asks for log-probs at given ids (L1s) but no ids were given")
            signal.given_ids_BTK, signal.given_logp_BTK = ids_BTK, logprobs_at(logits_BTV, ids_BTK)
        if request.entropy:
            signal.entropy_BT = token_entropy(logits_BTV) * mask_BT
        if request.full:
            signal.logits_BTV = logits_BTV
        return signal


@torch.no_grad()
def ema_update(teacher, student, decay: float) -> None:
    """OPSD's EMA self-teacher: every weight becomes ``decay x teacher + (1 - decay) x student``."""
    for mine, theirs in zip(teacher.parameters(), student.parameters(), strict=True):  # tied weights once
        mine.lerp_(theirs.to(mine.dtype), 1 - decay)
