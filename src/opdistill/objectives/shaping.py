"""Per-token weights and masks of one step, from the ``weighting`` and verifier settings of the config.

Orchestration only: it gathers what ``weighting.py``'s pure functions need (the teacher's signal, the
student's statistics over the whole batch, verifier rewards, the run's state) and hands the loop a shaped
loss mask plus a ``Shaping``. Batch-wide statistics (TIP's selection, SEAD's percentiles, SCOPE's groups)
are computed here over the whole step, never per micro-batch, so micro-batching cannot change the update.
"""

from __future__ import annotations

import math

import torch

from opdistill.config import Config
from opdistill.logits import CompletionLogits, paired_chunks, reduce_chunks
from opdistill.objectives import losses, weighting
from opdistill.objectives.objective import ShapingInputs
from opdistill.objectives.registry import OBJECTIVES
from opdistill.observe import diagnostics
from opdistill.types import Shaping, StepBatch


def shape(
    config: Config, student, batch: StepBatch, step: int, kat_ema: float | None = None
) -> tuple[Shaping, float | None]:
    """The step's ``Shaping``: the loss mask narrowed (loss windows, TIP, KAT, SEAD's skip zone) and the
    per-token weights; weighting metrics go into ``batch.metrics``. ``kat_ema`` is KAT's running threshold
    (None before its first step); its new value is returned beside the shaping."""
    weighting_config, objective, rollout, signal = (
        config.weighting,
        config.objective,
        batch.rollout,
        batch.signal,
    )
    assert signal is not None
    mask_BT = rollout.loss_mask_BT
    weight_BT = mask_BT.float()
    metrics = batch.metrics
    record = OBJECTIVES[objective.type]
    passed: dict[str, torch.Tensor] = {}
    if weighting_config.needs_student_pass or record.student_pass:
        passed = _student_pass(config, student, batch, record.student_entropy)
    student_logp_BT, student_entropy_BT = passed.get("logp"), passed.get("entropy")

    if weighting_config.position_decay:
        weight_BT = weight_BT * weighting.position_decay(
            mask_BT, weighting_config.position_decay, config.rollout.max_new_tokens
        )
    if weighting_config.position_limit:
        mask_BT = mask_BT & (
            torch.arange(mask_BT.shape[1], device=mask_BT.device) < weighting_config.position_limit
        )
    if weighting_config.loss_window:
        generator = torch.Generator().manual_seed(config.train.seed * 1_000_003 + step)
        mask_BT = weighting.window_mask(
            mask_BT, weighting_config.loss_window, weighting_config.loss_window_from, generator
        )
    if weighting_config.iw_opd_gamma:
        iw_BT, iw_metrics = weighting.iw_opd_weights(
            signal.token_logp_BT, rollout.sampler_logp_BT, mask_BT, weighting_config.iw_opd_gamma
        )
        weight_BT = weight_BT * iw_BT
        metrics.update(iw_metrics)
    if weighting_config.prune:
        assert signal.topk_ids_BTK is not None
        overlap_BT = diagnostics.topk_overlap(passed["topk_ids"], signal.topk_ids_BTK)
        prune_BT, prune_metrics = weighting.prune_weights(
            overlap_BT,
            mask_BT,
            weighting_config.prune_eta,
            weighting_config.prune_zeta,
            weighting_config.prune_max_events,
        )
        weight_BT = weight_BT * prune_BT
        metrics.update(prune_metrics)
    # student entropy × JSD_0.5 / ln 2 against the teacher, over the whole batch
    if weighting_config.tip_ratio:
        assert student_entropy_BT is not None
        mask_BT, tip_metrics = weighting.tip_keep_mask(
            student_entropy_BT, passed["jsd"], mask_BT, weighting_config.tip_ratio
        )
        metrics.update(tip_metrics)
    # k_t = max(ℓ_t, 0) on the sampled tokens [D]; the threshold follows the run's median
    if weighting_config.kat:
        assert student_logp_BT is not None
        kl_BT = (student_logp_BT - signal.token_logp_BT).clamp(min=0)
        threshold, kat_ema = weighting.kat_threshold(kl_BT, mask_BT, kat_ema, weighting_config.kat_kappa)
        mask_BT, trapped_B = weighting.kat_trap_mask(
            kl_BT,
            mask_BT,
            threshold,
            weighting_config.kat_window,
            weighting_config.kat_patience,
            weighting_config.kat_min_position,
        )
        metrics["kat_trap_rate"] = float(trapped_B.float().mean())

    shaping = Shaping(mask_BT=mask_BT, weight_BT=weight_BT)
    if batch.reward_B is not None:  # the RLVR hybrid's verifier terms (objective.rlvr_hybrid)
        correct_B = batch.reward_B > 0.5
        if objective.grpo_coef:
            shaping.bonus_B = (
                objective.grpo_coef
                * weighting.route_weights(correct_B, objective.route_rl)
                * weighting.grpo_advantage(batch.reward_B, config.rollout.n_per_prompt)
            )
        if objective.route_opd != "all":
            shaping.weight_BT = (
                shaping.weight_BT * weighting.route_weights(correct_B, objective.route_opd)[:, None]
            )
    if record.shaping is not None:  # the objective's own weights and masks (registry.py)
        inputs = ShapingInputs(
            objective,
            batch,
            student_logp_BT,
            student_entropy_BT,
            step,
            config.train.steps,
            config.rollout.n_per_prompt,
            metrics,
        )
        record.shaping(inputs, shaping)
    mask_BT = shaping.mask_BT

    kept = float(mask_BT.sum()) / max(float(rollout.loss_mask_BT.sum()), 1.0)
    if kept < 1:
        metrics["kept_token_frac"] = kept
    return shaping, kat_ema


@torch.no_grad()
def _student_pass(config: Config, student, batch: StepBatch, entropy: bool) -> dict[str, torch.Tensor]:
    """The untempered student over the whole step (the sampler's may be tempered), a chunk of logits at a
    time: each token's log-prob, and what the weighting reads — the entropy (TIP, or an objective's
    shaping), the top-K ids (pruning), JSD_0.5 / ln 2 against the teacher's full logits (TIP)."""
    weighting_config, rollout, signal = config.weighting, batch.rollout, batch.signal
    assert signal is not None
    logits = CompletionLogits(student, rollout)
    chunk_tokens = config.train.chunk_tokens
    if weighting_config.tip_ratio:
        assert signal.full_logits is not None
        chunks = paired_chunks(logits, signal.full_logits, chunk_tokens)
    else:
        chunks = logits.chunks(chunk_tokens)

    def reduce(rows: slice, positions: slice, logits_btV: torch.Tensor, teacher_btV=None) -> dict:
        out = {"logp": losses.token_logprobs(logits_btV, rollout.tokens_BT[rows, positions])}
        if weighting_config.tip_ratio or entropy:  # once, for whichever reads it
            out["entropy"] = diagnostics.token_entropy(logits_btV)
        if weighting_config.prune:
            out["topk_ids"] = logits_btV.topk(config.objective.topk, dim=-1).indices
        if teacher_btV is not None:
            out["jsd"] = losses.generalized_jsd(logits_btV, teacher_btV, 0.5) / math.log(2)
        return out

    return reduce_chunks(chunks, logits.shape, reduce)
