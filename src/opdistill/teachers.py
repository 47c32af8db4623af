"""Teachers score the student's tokens. The loop asks for exactly the signal its objective needs."""

from __future__ import annotations

from typing import Literal, Protocol

import torch

from opdistill.losses import at_least_fp32, token_logprobs
from opdistill.models import completion_logits
from opdistill.types import Rollout, TeacherSignal

SignalLevel = Literal["sampled", "full"]  # L0 and L2 of ALGORITHMS.md §1.3


class Teacher(Protocol):
    def score(self, rollout: Rollout, level: SignalLevel) -> TeacherSignal: ...


class LocalTeacher:
    """A frozen HF model in this process; one forward over prompt ⊕ completion per rollout."""

    def __init__(self, model):
        self.model = model.eval().requires_grad_(False)

    @torch.inference_mode()
    def score(self, rollout: Rollout, level: SignalLevel) -> TeacherSignal:
        logits_BTV = completion_logits(self.model, rollout)
        if level == "sampled":  # L0: never keep a [B, T, V] tensor
            return TeacherSignal(
                token_logp_BT=token_logprobs(logits_BTV, rollout.tokens_BT) * rollout.loss_mask_BT
            )
        logp_BTV = torch.log_softmax(at_least_fp32(logits_BTV), dim=-1)
        token_logp_BT = (
            logp_BTV.gather(-1, rollout.tokens_BT.unsqueeze(-1)).squeeze(-1) * rollout.loss_mask_BT
        )
        return TeacherSignal(token_logp_BT=token_logp_BT, logp_BTV=logp_BTV)
