"""One update: backward over micro-batches with one global token normaliser, the optional SFT-stabiliser
term, clip and AdamW. Shared by the loop and the cold start."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from opdistill.config import Config
from opdistill.logits import completion_logits
from opdistill.objectives import losses
from opdistill.objectives.registry import OBJECTIVES, objective_loss
from opdistill.training import distributed
from opdistill.training.distributed import ONE_PROCESS, World
from opdistill.types import StepBatch


def train_step(config: Config, model, optimizer, batch: StepBatch, world: World = ONE_PROCESS) -> dict:
    """Backward over micro-batches, each loss normalised by the whole step's counts over all micro-batches and
    ranks (so neither micro-batching nor world size changes the update), plus the optional SFT-stabiliser
    term; then clip and AdamW (their seconds: ``time_backward_s``, ``time_optimizer_s``). A non-finite loss or
    gradient skips the update; the returned metrics say so."""
    objective, rollout = config.objective, batch.rollout
    optimizer.zero_grad(set_to_none=True)
    loss_mask_BT = rollout.loss_mask_BT if batch.shaping is None else batch.shaping.mask_BT
    tokens = distributed.all_sum(float(loss_mask_BT.sum()), world)
    rows = distributed.all_sum(float(rollout.tokens_BT.shape[0]), world)
    aggregation = OBJECTIVES[objective.type].aggregation or objective.aggregation
    normalizer = losses.Normalizer(aggregation, tokens, rows, objective.aggregation_constant)
    sft, started = batch.sft_rollout, time.perf_counter()
    totals = _backward(
        model,
        loss_mask_BT,
        normalizer,
        lambda part: micro_batch_loss(config, model, batch.select(part)),
        config.train.micro_batch_size,
        world,
        last=sft is None,
    )
    trained_tokens = int(rollout.attention_mask.sum())
    if sft is not None:  # the SFT-stabiliser (math.md §5.5): token-mean CE on its own batch
        sft_tokens = distributed.all_sum(float(sft.loss_mask_BT.sum()), world)
        sft_normalizer = losses.Normalizer(
            "token-mean", sft_tokens, distributed.all_sum(float(len(sft.tokens_BT)), world)
        )

        def sft_loss(part: slice):
            mb = sft.select(part)
            nll_BT = -losses.token_logprobs(student_logits(config, model, mb), mb.tokens_BT)
            return objective.sft_coef * nll_BT, {"sft_nll": losses.masked_mean(nll_BT, mb.loss_mask_BT)}

        sft_totals = _backward(
            model, sft.loss_mask_BT, sft_normalizer, sft_loss, config.train.micro_batch_size, world, last=True
        )
        totals["loss"] += sft_totals.pop("loss")
        totals.update(sft_totals)
        trained_tokens += int(sft.attention_mask.sum())
    totals["loss"] = distributed.all_sum(totals["loss"], world)  # every rank takes the same decision below
    backward_s, started = time.perf_counter() - started, time.perf_counter()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
    grad_norm = float(getattr(total_norm, "full_tensor", lambda: total_norm)())  # FSDP2: a DTensor
    if math.isfinite(totals["loss"]) and math.isfinite(grad_norm):
        if config.optim.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), config.optim.grad_clip, total_norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        **totals,
        "time_backward_s": backward_s,
        "time_optimizer_s": time.perf_counter() - started,
        "grad_norm": grad_norm,
        "loss_tokens": int(tokens),
        "student_train_tokens": trained_tokens,
    }


def micro_batch_loss(config: Config, model, batch: StepBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """The configured objective's per-token loss on one micro-batch, through the student's forward (with
    grad)."""
    return objective_loss(config, student_logits(config, model, batch.rollout), batch)


def student_logits(config: Config, model, rollout) -> torch.Tensor:
    """The student's completion logits with gradient, for the loss: under ``train.precision=bf16`` the
    forward autocasts to bf16 (the weights, their gradients and AdamW's state stay fp32: the master copy)
    and the logits come back as fp32, so the loss's math is fp32 either way."""
    if config.train.precision == "fp32":
        return completion_logits(model, rollout)
    device = rollout.tokens_BT.device.type
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        logits_BTV = completion_logits(model, rollout)
    return logits_BTV.float()


PerTokenLoss = Callable[[slice], tuple[torch.Tensor, dict[str, float]]]


def _backward(
    model,
    loss_mask_BT: torch.Tensor,
    normalizer: losses.Normalizer,
    per_token_loss: PerTokenLoss,
    micro_batch_size: int,
    world: World,
    last: bool,
) -> dict[str, float]:
    """Accumulate gradients of ``normalizer(per_token_loss(rows))`` over micro-batches of this rank's rows;
    returns this rank's summed loss and token-weighted metrics (min/max for ``*_min``/``*_max``). Ranks
    average their gradients, so each rank's loss counts ``world.size`` times; they sync once, in the step's
    ``last`` backward."""
    rows = loss_mask_BT.shape[0]
    micro = micro_batch_size or rows
    tokens = max(float(loss_mask_BT.sum()), 1.0)
    totals: dict[str, float] = {"loss": 0.0}
    for start in range(0, rows, micro):
        part = slice(start, start + micro)
        per_token_BT, metrics = per_token_loss(part)
        loss = normalizer(per_token_BT, loss_mask_BT[part])
        with distributed.gradient_sync(model, sync=last and start + micro >= rows):
            (loss * world.size).backward()
        totals["loss"] += float(loss.detach())
        share = float(loss_mask_BT[part].sum()) / tokens
        for key, value in metrics.items():
            if key.endswith(("_min", "_max")):
                pick = min if key.endswith("_min") else max
                totals[key] = pick(totals[key], value) if key in totals else value
            else:
                totals[key] = totals.get(key, 0.0) + share * value
    return totals
