"""Why a run works or fails: the diagnostics of math.md §11.4 and §13 on the step's own rollouts.

Orchestration only: every quantity is a pure function in ``diagnostics.py``. Every
``train.diagnostics_every`` steps the teacher's one pass over the rollouts also sends its top-k and entropy
(``Config.diagnostics_request``), and ``diagnose`` adds one student forward without gradient, before the
update, so both sides describe the policy that sampled the tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from opdistill.config import Config
from opdistill.logits import CompletionLogits, paired_chunks, reduce_chunks
from opdistill.objectives import losses, weighting
from opdistill.observe import diagnostics
from opdistill.observe.evaluate import decode_completions
from opdistill.types import StepBatch

POSITION_BUCKETS = 10  # per-position diagnostics by decile of each response's own length
TOKEN_BINS = (0, 100, 500, 2000)  # and by absolute token position: [0, 100), [100, 500), [500, 2k), [2k, ∞)
MIN_TEACHER_HER = 0.02  # [D] a teacher high-entropy rate below this is too small to compare against
TRUNCATION_STEPS = 3  # [D] steps in a row with most responses truncated before the alarm
RISING_EVALS = 3  # [D] evaluations in a row with rising teacher_kl before the alarm
TRAP_RATE = 0.25  # [D] share of responses in a KL agreement trap that trips the alarm
STALL_EVALS = 4  # [D] evaluations over which teacher_kl stays flat and high and accuracy does not rise
STALL_MIN_KL = 0.1  # [D] nats/token: a mean teacher_kl above this is far from zero
STALL_FLAT = 0.2  # [D] a relative change of teacher_kl under this over the window is flat
STALL_MARGIN = 0.01  # [D] a rise in held-out accuracy up to this over the window is no progress


@torch.no_grad()
def diagnose(config: Config, student, tokenizer, batch: StepBatch) -> dict[str, float | list[float | None]]:
    """Top-k overlap and masses, entropies and high-entropy rates of both models, |log-ratio| quantiles,
    per-position sampled reverse KL (by decile of length, and by token position in math.md §13.3's bins),
    exact reverse KL, overlap and teacher rank, the 3-gram repetition rate and StableOPD's zlib repetition
    rate of the decoded responses, on ``batch``'s rollouts. Entropies of the teacher are at the student's
    states. Under a teacher with another tokenizer (math.md §18) the state-level statistics are taken where
    both have read the same text (span starts) and the log-ratios per aligned span, at its last position."""
    rollout, signal = batch.rollout, batch.signal
    assert signal is not None and signal.topk_ids_BTK is not None and signal.topk_logp_BTK is not None
    assert signal.entropy_BT is not None
    mask_BT, k = rollout.loss_mask_BT, signal.topk_ids_BTK.shape[-1]
    student_logits = CompletionLogits(student, rollout)

    def reduce(rows: slice, positions: slice, logits_btV: torch.Tensor, teacher_btV=None) -> dict:
        ids_btK, topk_btK = losses.topk_logprobs(logits_btV, k)
        out = {
            "ids": ids_btK,
            "topk": topk_btK,
            "logp": losses.token_logprobs(logits_btV, rollout.tokens_BT[rows, positions]),
            "entropy": diagnostics.token_entropy(logits_btV),
        }
        if teacher_btV is not None:
            out["exact"] = losses.generalized_jsd(logits_btV, teacher_btV, beta=1.0)
        return out

    chunk_tokens = config.train.chunk_tokens
    spans = signal.spans
    if signal.full_logits is not None and spans is None:
        chunks = paired_chunks(student_logits, signal.full_logits, chunk_tokens)
    else:
        chunks = student_logits.chunks(chunk_tokens)
    stats = reduce_chunks(chunks, student_logits.shape, reduce)
    student_ids_BTK, student_topk_BTK, student_entropy_BT = stats["ids"], stats["topk"], stats["entropy"]
    state_BT, ratio_BT, student_BT = mask_BT, mask_BT, stats["logp"]
    if spans is not None:
        state_BT, ratio_BT = spans.start_BT, mask_BT & losses.span_ends(spans.span_BT)
        student_BT = losses.span_sums(student_BT, spans.span_BT)
    log_ratio_BT = student_BT - signal.token_logp_BT
    overlap_BT = diagnostics.topk_overlap(student_ids_BTK, signal.topk_ids_BTK)
    rank_BT = diagnostics.teacher_rank(signal.topk_ids_BTK, rollout.tokens_BT)
    out: dict[str, float | list[float | None]] = {
        **diagnostics.overlap_stats(
            student_ids_BTK, student_topk_BTK, signal.topk_ids_BTK, signal.topk_logp_BTK, state_BT
        ),
        **diagnostics.abs_log_ratio_quantiles(log_ratio_BT, ratio_BT),
        "teacher_entropy": losses.masked_mean(signal.entropy_BT, state_BT),
        "entropy_gap": diagnostics.entropy_gap(student_entropy_BT, signal.entropy_BT, state_BT),
        "student_high_entropy_rate": diagnostics.high_entropy_rate(student_entropy_BT, state_BT),
        "teacher_high_entropy_rate": diagnostics.high_entropy_rate(signal.entropy_BT, state_BT),
        "repeated_token_rate": diagnostics.repeated_token_rate(rollout.tokens_BT, mask_BT),
        "repetition_rate": diagnostics.repetition_rate(
            decode_completions(tokenizer, rollout.tokens_BT, rollout.loss_mask_BT)
        ),
        "kl_by_token_position": diagnostics.position_buckets(log_ratio_BT, ratio_BT, TOKEN_BINS),
        "kl_by_position": diagnostics.relative_buckets(log_ratio_BT, ratio_BT, POSITION_BUCKETS),
        "overlap_by_position": diagnostics.relative_buckets(overlap_BT, state_BT, POSITION_BUCKETS),
        "teacher_rank_by_position": diagnostics.relative_buckets(
            rank_BT.double(), state_BT, POSITION_BUCKETS
        ),
    }
    # KAT's rule, as a diagnostic: where the rollouts are long enough to trap
    kat = config.weighting
    if mask_BT.sum(1).max() >= kat.kat_min_position + kat.kat_patience * kat.kat_window:
        kl_BT = log_ratio_BT.clamp(min=0)
        threshold = kat.kat_kappa * float(kl_BT[mask_BT.bool()].median())
        _, trapped_B = weighting.kat_trap_mask(
            kl_BT,
            mask_BT,
            threshold,
            kat.kat_window,
            kat.kat_patience,
            kat.kat_min_position,
        )
        out["kl_trap_rate"] = float(trapped_B.float().mean())
    if "exact" in stats:  # the exact reverse KL where the teacher's full logits exist
        out["exact_kl_by_position"] = diagnostics.relative_buckets(stats["exact"], mask_BT, POSITION_BUCKETS)
    return out


@dataclass
class AlarmState:
    """What the alarms keep across steps (checkpointed with the run): which have tripped, and the short
    histories the rules read, so a resumed run neither repeats nor forgets an alarm."""

    tripped: list[str] = field(default_factory=list)
    truncation_history: list[float] = field(default_factory=list)  # the last TRUNCATION_STEPS rates
    kl_since_eval: list[float] = field(default_factory=list)  # teacher_kl of each step since the last eval
    kl_per_eval: list[float] = field(default_factory=list)  # the mean teacher_kl between evaluations
    acc_per_eval: list[float] = field(default_factory=list)  # the last STALL_EVALS evaluation accuracies


def alarms(record: dict, state: AlarmState, evaluated: bool, accuracy: float | None = None) -> list[str]:
    """Alarms that trip for the first time at this step, each as "name: message" (math.md §13; each
    trips once per run); ``state`` is updated with this step. ``accuracy``: the held-out accuracy of the
    evaluation made at this step, if any.

    non_finite: the step's loss or gradient was not finite (the step was skipped) · diversity_collapse: the
    student's high-entropy-token rate is under half the teacher's at the same states (math.md §13.1) ·
    truncation_collapse: most responses hit the length cap for several steps (StableOPD's length inflation,
    math.md §13.5) · teacher_kl_rising: the mean teacher_kl between evaluations rose for several evaluations ·
    no_progress: the mean teacher_kl stayed flat and far above zero and the accuracy did not rise for several
    evaluations (math.md §11.4, §13.6) · kl_agreement_trap: a quarter or more of the responses end in a KAT
    trap (math.md §7.6)."""
    tripped = state.tripped
    fired: list[str] = []

    def trip(name: str, message: str) -> None:
        if name not in tripped:
            tripped.append(name)
            fired.append(f"{name}: {message}")

    if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
        trip(
            "non_finite",
            f"the loss or gradient was not finite at step {record['step']}; the step was skipped.",
        )
    student = record.get("student_high_entropy_rate", math.inf)  # both are there on diagnostics steps
    teacher = record.get("teacher_high_entropy_rate", 0.0)
    if teacher >= MIN_TEACHER_HER and diagnostics.diversity_collapse(student, teacher):
        trip(
            "diversity_collapse",
            f"the student's high-entropy-token rate {student:.3f} is under half the teacher's {teacher:.3f} "
            "at the same states (EOPD saw 6.8% vs 18.5% under plain OPD).",
        )
    if record.get("kl_trap_rate", 0.0) >= TRAP_RATE:
        trip(
            "kl_agreement_trap",
            f"{record['kl_trap_rate']:.0%} of the responses end in a stretch where the teacher agrees with "
            "the student (persistently low KL after a drift; KAT, Xin et al. 2026): the teacher gives no "
            "corrective signal there. Consider weighting.kat=true.",
        )
    if "truncation_rate" in record:
        history = state.truncation_history
        history[:] = [*history, record["truncation_rate"]][-TRUNCATION_STEPS:]
        if len(history) == TRUNCATION_STEPS and min(history) >= 0.5:
            episodes = "turns" in record  # an episode is truncated when it runs out of turns or tokens
            what = (
                "episodes ran out of env.max_turns or env.max_tokens"
                if episodes
                else "responses hit rollout.max_new_tokens"
            )
            why = (
                "the student does not finish in time"
                if episodes
                else "StableOPD's truncation-repetition inflation"
            )
            trip(
                "truncation_collapse",
                f"at least half the {what} for {TRUNCATION_STEPS} steps in a row ({why}).",
            )
    if "teacher_kl" in record:
        window = state.kl_since_eval
        window.append(record["teacher_kl"])
        if evaluated:
            per_eval = state.kl_per_eval
            per_eval.append(sum(window) / len(window))
            window.clear()
            if diagnostics.rising(per_eval, RISING_EVALS):
                trip(
                    "teacher_kl_rising",
                    f"the mean teacher_kl rose over the last {RISING_EVALS} evaluations: "
                    f"{', '.join(f'{v:.3g}' for v in per_eval[-RISING_EVALS:])}.",
                )
            if accuracy is not None:
                accs = state.acc_per_eval
                accs[:] = [*accs, accuracy][-STALL_EVALS:]
                if diagnostics.no_progress(
                    per_eval, accs, STALL_EVALS, STALL_MIN_KL, STALL_FLAT, STALL_MARGIN
                ):
                    trip(
                        "no_progress",
                        f"over the last {STALL_EVALS} evaluations the mean teacher_kl stayed flat near "
                        f"{per_eval[-1]:.3g} nats/token and the accuracy did not rise ({accs[0]:.3g} → "
                        f"{accs[-1]:.3g}): the student may be unable to follow the teacher (too small, a "
                        "format or thinking pattern it does not share, or a teacher with nothing new to "
                        "teach). Try an off-policy cold start (cold_start.samples), teacher-aligned prompt "
                        "selection (data.select_fraction) or a larger student.",
                    )
    return fired
