"""A step's batch, stage by stage: this rank's prompts → roll out (or take completions that are not the
student's) → refine → verify → score. ``next_batch`` reads top to bottom; ``BatchContext`` is what every stage
reads, fixed for the run.

Completions come from the student's own samples (OPD), the dataset, fresh teacher samples, or a cached pool of
teacher samples — or, for GKD's data mixing, a per-step coin between the student's samples and one of the
others. What a step sees depends only on (seed, step), which keeps resume exact.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from opdistill.config import Config, EnvConfig
from opdistill.data.curriculum import curriculum
from opdistill.data.examples import (
    Example,
    ExampleStream,
    left_pad,
    privileged_view,
    read_jsonl,
    rollout_of,
    write_jsonl,
)
from opdistill.data.rendering import completion_target, encode_prompts, end_ids
from opdistill.data.selection import selected_prompts
from opdistill.data.tasks import Task
from opdistill.envs import make_env
from opdistill.errors import UserError
from opdistill.logits import topk_ids
from opdistill.objectives.registry import OBJECTIVES
from opdistill.observe import diagnostics
from opdistill.observe.evaluate import completion_texts, sample_completions
from opdistill.observe.timing import timed
from opdistill.sampling import episodes
from opdistill.sampling.episodes import EpisodeSpec
from opdistill.sampling.refine import refine
from opdistill.sampling.rollout import sample_prompts
from opdistill.sampling.speculative import SpeculativeGuide
from opdistill.sampling.vllm_engine import VllmEngine
from opdistill.teachers.base import Teacher
from opdistill.teachers.cross import CrossTokenizerTeacher
from opdistill.training.distributed import ONE_PROCESS, World
from opdistill.types import Cost, Rollout, SignalRequest, StepBatch, TeacherSignal


class PromptStream(Protocol):
    """Where a step's prompts come from: a task's stream, a curriculum or a selection."""

    def batch(self, step: int, size: int) -> list[Example]: ...


@dataclass(frozen=True)
class BatchContext:
    """What every stage of a step reads; built once per run by ``batch_context``."""

    config: Config
    task: Task
    tokenizer: Any
    student: torch.nn.Module  # samples (the loss runs through its DDP/FSDP wrapper, not through this)
    teachers: Mapping[str, Teacher]  # by the tag examples name them with ("" = the default teacher)
    scorer: Scorer
    prompts: PromptStream  # the student's prompts: the task's, a curriculum's or a selection's
    off_policy: (
        PromptStream  # prompts with completions that are not the student's: the dataset or a teacher pool
    )
    world: World = ONE_PROCESS
    reference: Teacher | None = None  # the initial student, frozen: scores the reference-KL term
    engine: VllmEngine | None = None  # rollout.engine=vllm: samples the student's rollouts
    env: EpisodeSpec | None = None  # env.name: each rollout is a multi-turn episode in a fresh environment

    @property
    def teacher(self) -> Any:
        """The default teacher: a LocalTeacher wherever it must sample (the config checks)."""
        return self.teachers.get("")

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device


def batch_context(
    config: Config,
    task: Task,
    tokenizer,
    student,
    teachers: Mapping[str, Teacher],
    run_dir: Path,
    world: World = ONE_PROCESS,
    reference: Teacher | None = None,
    engine: VllmEngine | None = None,
) -> tuple[BatchContext, Cost]:
    """The run's ``BatchContext``, and the cost of the one-time work it took (a curriculum's difficulties, a
    prompt selection, a teacher pool: made once, kept in the run directory, reused on resume)."""
    data, cost = config.data, Cost()
    prompts: PromptStream = task.train
    if data.curriculum:
        prompts, cost = curriculum(config, task, tokenizer, student, run_dir, world)
    elif data.select_fraction:
        prompts, cost = selected_prompts(config, task, tokenizer, student, teachers.get(""), run_dir, world)
    off_policy: PromptStream = task.train
    if data.completions == "teacher_pool" and uses_off_policy(config):
        off_policy, pool_cost = teacher_pool(config, task, tokenizer, teachers[""], run_dir, world)
        cost = cost + pool_cost
    scorer = Scorer(config, tokenizer, student, teachers)
    env = episode_spec(config.env)
    context = BatchContext(
        config, task, tokenizer, student, teachers, scorer, prompts, off_policy, world, reference, engine, env
    )
    return context, cost


def episode_spec(env: EnvConfig) -> EpisodeSpec | None:
    """How ``env.*`` plays episodes (None without an environment); the environment is checked here."""
    if not env.name:
        return None
    return EpisodeSpec(make_env(env.name, env.options), env.max_turns, env.max_tokens, env.mask_observations)


def uses_off_policy(config: Config) -> bool:
    """Whether some step trains on completions that are not the student's: SFT targets, GKD's off-policy
    batches (λ < 1), the SFT-stabiliser."""
    objective = config.objective
    return (
        not OBJECTIVES[objective.type].distills
        or config.rollout.on_policy_fraction < 1
        or objective.sft_coef > 0
    )


def next_batch(context: BatchContext, step: int) -> StepBatch:
    """Step ``step``'s batch on this rank: its share of the step's prompts, their completions, and for a
    distillation objective the teacher's scores (only the signal the objective needs) and verifier rewards.
    The seconds of sampling and of the teacher's scoring are in its metrics (``timing.timed``)."""
    config, timings = context.config, {}
    if not OBJECTIVES[config.objective.type].distills:
        with timed(timings, "sampling"):
            rollout, metrics, _ = off_policy_batch(context, step)
        return StepBatch(rollout, None, {**metrics, **timings})
    on_policy = gkd_coin(config, step)
    reward_B = None
    with timed(timings, "sampling"):
        if on_policy:
            examples = this_rank(context, context.prompts, step)
            rows = [ex for ex in examples for _ in range(config.rollout.n_per_prompt)]  # each row's example
            rollout, metrics, episode_reward_B = roll_out(context, examples, step)
            if config.trd.mode in ("prefix", "prompt"):  # TRD: distil along the teacher's refinement
                rollout = refined(context, rollout, rows, step, metrics)
            if config.objective.needs_reward:  # an episode's reward is its environment's verdict
                reward_B = verify(context, rollout, rows) if episode_reward_B is None else episode_reward_B
                metrics["reward"] = float(reward_B.mean())
        else:
            rollout, metrics, rows = off_policy_batch(context, step)
    metrics["on_policy"] = float(on_policy)
    metrics["teacher_scored_tokens"] = int(rollout.attention_mask.sum())
    request = config.diagnostics_request if config.diagnostics_due(step) else config.teacher_request
    with timed(timings, "teacher"):
        signal, score_metrics = context.scorer(rollout, rows, request)
        reference_logp_BT = None
        if context.reference is not None:
            reference_logp_BT = context.reference.score(rollout, SignalRequest()).token_logp_BT
    metrics.update(score_metrics)
    batch = StepBatch(rollout, signal, metrics, reward_B=reward_B, reference_logp_BT=reference_logp_BT)
    if config.objective.sft_coef > 0:  # the same prompts, with dataset or teacher completions
        # an off-policy step already holds them: reuse rather than generate a second time
        with timed(timings, "sampling"):
            batch.sft_rollout, sft_metrics = (
                off_policy_batch(context, step)[:2] if on_policy else (rollout, {})
            )
        for key, value in sft_metrics.items():
            metrics[key] = metrics.get(key, 0) + value
    metrics.update(timings)
    return batch


def gkd_coin(config: Config, step: int) -> bool:
    """GKD's data mixing: whether step ``step`` trains on the student's samples (probability λ). One coin per
    step, a function of (seed, step), so resume replays it."""
    fraction = config.rollout.on_policy_fraction
    return fraction >= 1 or random.Random(f"gkd-{config.train.seed}-{step}").random() < fraction


def this_rank(context: BatchContext, stream: PromptStream, step: int) -> list[Example]:
    """This rank's share of step ``step``'s prompts (all of them in one process)."""
    per_step = context.config.train.prompts_per_step
    first, count = context.world.share(per_step)
    return stream.batch(step, per_step)[first : first + count]


def sampled(
    context: BatchContext, model, examples: list[Example], temperature: float, repeats: int, guide=None
):
    """``repeats`` samples of ``model`` per example, this rank's rows of the step's batch."""
    config, tokenizer = context.config, context.tokenizer
    first, _ = context.world.share(config.train.prompts_per_step)
    prompts = [p for p in encode_prompts(tokenizer, examples) for _ in range(repeats)]
    return sample_prompts(
        model,
        tokenizer,
        prompts,
        max_new_tokens=config.rollout.max_new_tokens,
        temperature=temperature,
        top_p=config.rollout.top_p,
        rows=(first * repeats, config.train.prompts_per_step * repeats),
        all_finished=context.world.all_finished if config.train.parallel == "fsdp" else bool,
        guide=guide,
    )


def roll_out(
    context: BatchContext, examples: list[Example], step: int
) -> tuple[Rollout, dict[str, float], torch.Tensor | None]:
    """The student's own samples, ``rollout.n_per_prompt`` per prompt, and with an environment each
    episode's reward; with SKD, the teacher verifies each token with its own (seed, step) random stream."""
    settings = context.config.rollout
    guide = None
    if settings.skd_topk >= 0:
        seed = random.Random(f"skd-{context.config.train.seed}-{step}").getrandbits(63)
        generator = torch.Generator().manual_seed(seed)
        guide = SpeculativeGuide(
            context.teacher.model, settings.skd_topk, settings.temperature, settings.top_p, generator
        )
    reward_B, episode_metrics = None, {}
    if context.env is not None:
        rows = [ex for ex in examples for _ in range(settings.n_per_prompt)]
        takeover = context.config.trd.mode == "takeover"
        rollout, reward_B, episode_metrics = played(
            context, context.student, rows, step, guide=guide, takeover=takeover
        )
    elif context.engine is not None:
        rollout = engine_sampled(context, examples, step)
    else:
        rollout = sampled(
            context, context.student, examples, settings.temperature, settings.n_per_prompt, guide
        )
    metrics = {
        "response_length": float(rollout.loss_mask_BT.sum(1).float().mean()),
        "truncation_rate": diagnostics.truncation_rate(rollout.truncated_B),
        "student_sampled_tokens": int(rollout.loss_mask_BT.sum()),
    }
    if guide is not None:  # the teacher read every prompt and sampled token once, through its KV cache
        metrics.update(guide.stats(), teacher_generated_tokens=int(rollout.attention_mask.sum()))
    if context.engine is not None:  # optimizer steps the engine's weights are behind the student's
        metrics["rollout_lag"] = step - context.engine.synced_step
    metrics.update(episode_metrics)
    return rollout, metrics, reward_B


def played(
    context: BatchContext,
    model,
    rows: list[Example],
    step: int,
    guide=None,
    temperature: float | None = None,
    takeover: bool = False,
) -> tuple[Rollout, torch.Tensor, dict[str, float]]:
    """Multi-turn episodes of ``model`` in fresh environments, one per row, with their rewards; the random
    stream is this rank's for (seed, step). With ``takeover`` the teacher plays on in the failed ones."""
    config, spec, tokenizer = context.config, context.env, context.tokenizer
    assert spec is not None
    seed = random.Random(f"env-{config.train.seed}-{step}-{context.world.rank}").getrandbits(63)
    settings = {
        "max_turns": spec.max_turns,
        "max_new_tokens": config.rollout.max_new_tokens,
        "max_tokens": spec.max_tokens,
        "top_p": config.rollout.top_p,
        "generator": torch.Generator().manual_seed(seed),
    }
    temperature = config.rollout.temperature if temperature is None else temperature
    done = episodes.play(
        model,
        tokenizer,
        episodes.start(tokenizer, rows, spec.make_env),
        temperature=temperature,
        guide=guide,
        **settings,
    )
    reward_B = torch.tensor([e.reward for e in done], device=context.device)
    metrics = {"turns": sum(e.turns for e in done) / len(done), "episode_reward": float(reward_B.mean())}
    if takeover:
        done, takeover_metrics = episodes.take_over(
            context.teacher.model,
            tokenizer,
            done,
            rows,
            spec.make_env,
            cut_topk=config.trd.cut_topk,
            verified=config.trd.select == "verified",
            temperature=config.trd.temperature,
            **settings,
        )
        metrics.update(takeover_metrics)
        reward_B = torch.tensor([e.reward for e in done], device=context.device)
    rollout = episodes.as_rollout(done, tokenizer.pad_token_id, context.device, spec.mask_observations)
    return rollout, reward_B, metrics


def engine_sampled(context: BatchContext, examples: list[Example], step: int) -> Rollout:
    """The student's samples from the vLLM engine: ``rollout.n_per_prompt`` per example, each row seeded by
    (seed, step, its index in the step's batch), so a row's sample is the same for any world size."""
    config, tokenizer = context.config, context.tokenizer
    settings, engine = config.rollout, context.engine
    assert engine is not None
    first, _ = context.world.share(config.train.prompts_per_step)
    prompts = [p for p in encode_prompts(tokenizer, examples) for _ in range(settings.n_per_prompt)]
    seed = random.Random(f"vllm-{config.train.seed}-{step}").getrandbits(30)
    return engine.sample(
        prompts,
        max_new_tokens=settings.max_new_tokens,
        end_ids=end_ids(tokenizer),
        pad_id=tokenizer.pad_token_id,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=seed + first * settings.n_per_prompt,
        device=context.device,
    )


def refined(
    context: BatchContext, rollout: Rollout, rows: list[Example], step: int, metrics: dict[str, float]
) -> Rollout:
    """TRD: each rollout cut where the teacher disagrees and continued by it (sampling/refine.py)."""
    config = context.config
    generator = torch.Generator().manual_seed(
        random.Random(f"trd-{config.train.seed}-{step}").getrandbits(63)
    )
    rollout, trd_metrics = refine(
        rollout,
        rows,
        teacher=context.teacher.model,
        student=context.student,
        tokenizer=context.tokenizer,
        settings=config.trd,
        max_new_tokens=config.rollout.max_new_tokens,
        verify=context.task.verify,
        generator=generator,
    )
    metrics.update(trd_metrics)
    return rollout


def verify(context: BatchContext, rollout: Rollout, rows: list[Example]) -> torch.Tensor:
    """1.0 where the task's verifier accepts a row's completion, else 0.0."""
    tokenizer = context.tokenizer
    unanswered = [ex.id or ex.prompt for ex in rows if not ex.answer]
    if unanswered and not context.config.data.verifier:
        raise UserError(f"verifier rewards need an 'answer' for every prompt; {unanswered[0]!r} has none.")
    texts = completion_texts(tokenizer, rollout)
    outcome = [float(context.task.verify(text, ex)) for text, ex in zip(texts, rows, strict=True)]
    return torch.tensor(outcome, device=context.device)


def off_policy_batch(context: BatchContext, step: int) -> tuple[Rollout, dict[str, float], list[Example]]:
    """Completions that are not the student's, one per prompt (fresh teacher samples, or the dataset's or the
    teacher pool's), and the prompts' examples."""
    config = context.config
    if config.data.completions == "teacher":
        examples = this_rank(context, context.task.train, step)
        temperature = config.data.teacher_temperature
        if context.env is not None:  # the teacher plays the episodes
            rollout = played(context, context.teacher.model, examples, step, temperature=temperature)[0]
            return rollout, {"teacher_generated_tokens": int(rollout.loss_mask_BT.sum())}, examples
        rollout = sampled(context, context.teacher.model, examples, temperature, 1)
        return rollout, {"teacher_generated_tokens": int(rollout.attention_mask.sum())}, examples
    if context.env is not None:  # the environment's demonstrations, played through it
        examples = this_rank(context, context.task.train, step)
        return demonstrations(context, examples), {}, examples
    examples = this_rank(context, context.off_policy, step)
    missing = [ex.id or ex.prompt for ex in examples if not ex.completion]
    if missing:
        raise UserError(f"training on dataset completions needs a 'completion'; {missing[0]!r} has none.")
    tokenizer = context.tokenizer
    completions = [completion_target(tokenizer, ex) for ex in examples]
    rollout = rollout_of(encode_prompts(tokenizer, examples), completions, tokenizer.pad_token_id)
    return rollout.to(context.device), {}, examples


def demonstrations(context: BatchContext, examples: list[Example]) -> Rollout:
    """Episodes played with the environment's demonstration turns (SFT targets for a multi-turn task)."""
    assert context.env is not None
    demonstrate = getattr(context.env.make_env(), "demonstration", None)
    if demonstrate is None:
        raise UserError(
            f"environment {context.config.env.name!r} has no demonstration(example) to train on: use "
            "data.completions=teacher (the teacher plays the episodes)."
        )
    tokenizer = context.tokenizer
    started = episodes.start(tokenizer, examples, context.env.make_env)
    done = episodes.demonstrated(tokenizer, started, [demonstrate(ex) for ex in examples])
    return episodes.as_rollout(done, tokenizer.pad_token_id, context.device)


def score(
    config: Config,
    student,
    teacher: Teacher,
    rollout: Rollout,
    request: SignalRequest | None = None,
    teacher_view: Rollout | None = None,
    rows: Sequence[Example] = (),
) -> TeacherSignal:
    """The teacher's signal for ``rollout`` (``request``, by default the objective's), scored on
    ``teacher_view`` when given (the same completions after other prompts: OPSD); for L1s it scores the
    student's own top-K ids at each visited state (one student forward without gradient, on the student's
    prompts, a chunk of logits at a time). A teacher with another tokenizer renders ``rows`` (each sequence's
    example) its own way."""
    request = request or config.teacher_request
    if isinstance(teacher, CrossTokenizerTeacher):
        return teacher.score(rollout, request, rows=rows)
    k, ids_BTK = config.objective.student_topk, None
    if k:
        ids_BTK = topk_ids(student, rollout, k, config.train.chunk_tokens)
    return teacher.score(teacher_view or rollout, request, ids_BTK)


class Scorer:
    """Who scores a step's rollout (rows = the example of each sequence): the teacher each example's
    ``teacher`` tag names (untagged: the default teacher), with per-teacher metrics when there are several; or
    OPSD's self-teacher, which sees every prompt with its example's privileged context (``opsd.template`` and
    ``opsd.system``). Its prompts are longer than the student's, and its scores line up with the student's by
    response position: ``completion_logits`` reads the last T + 1 positions of prompt ⊕ completion."""

    def __init__(self, config: Config, tokenizer, student, teachers: Mapping[str, Teacher]):
        self.config, self.tokenizer, self.student, self.teachers = config, tokenizer, student, teachers

    def __call__(
        self, rollout: Rollout, rows: Sequence[Example], request: SignalRequest
    ) -> tuple[TeacherSignal, dict[str, float]]:
        tags = [ex.teacher for ex in rows]
        unknown = sorted(set(tags) - set(self.teachers))
        if unknown:
            known = ", ".join(repr(t) for t in self.teachers if t) or "none"
            raise UserError(
                f"an example names teacher {unknown[0]!r}, which is not a key of teachers ({known})."
            )
        if self.config.opsd.teacher != "off":
            return score(
                self.config, self.student, self.teachers[""], rollout, request, self.view(rollout, rows)
            ), {}
        if len(self.teachers) == 1:
            signal = score(self.config, self.student, self.teachers[""], rollout, request, rows=rows)
            return signal, alignment_metrics(signal, rollout)
        parts, metrics = [], {}
        for tag in sorted(set(tags)):
            index_B = torch.tensor(
                [b for b, t in enumerate(tags) if t == tag], device=rollout.tokens_BT.device
            )
            part = rollout.select(index_B)
            signal = score(self.config, self.student, self.teachers[tag], part, request)
            parts.append((index_B, signal))
            name = tag or "default"
            metrics[f"teacher_sequences/{name}"] = len(index_B)
            if part.sampler_logp_BT.any():  # the student's own samples: the sampled reverse-KL estimate
                log_ratio_BT = (part.sampler_logp_BT - signal.token_logp_BT) * part.loss_mask_BT
                metrics[f"teacher_kl/{name}"] = float(
                    log_ratio_BT.sum() / part.loss_mask_BT.sum().clamp(min=1)
                )
        return TeacherSignal.gather(parts, len(tags)), metrics

    def view(self, rollout: Rollout, rows: Sequence[Example]) -> Rollout:
        """``rollout`` with the self-teacher's prompts: each row's example shown with its privileged
        context."""
        opsd = self.config.opsd
        missing = [ex.id or ex.prompt for ex in rows if not ex.privileged]
        if missing:
            raise UserError(
                f"opsd.teacher={opsd.teacher} needs a 'privileged' field on every example; {missing[0]!r} "
                "has none."
            )
        views = [privileged_view(ex, opsd.template, opsd.system) for ex in rows]
        ids_BP, mask_BP = left_pad(encode_prompts(self.tokenizer, views), self.tokenizer.pad_token_id)
        device = rollout.tokens_BT.device
        return dataclasses.replace(
            rollout, prompt_ids_BP=ids_BP.to(device), prompt_mask_BP=mask_BP.to(device)
        )


def alignment_metrics(signal: TeacherSignal, rollout: Rollout) -> dict[str, float]:
    """How a teacher with another tokenizer lined up with the student (none for one tokenizer): student
    tokens per aligned span, the share of one-to-one spans, the alignment's seconds, and the tokens the
    teacher read in its own ids (the step's ``teacher_scored_tokens``)."""
    if signal.spans is None:
        return {}
    mask_BT, spans = rollout.loss_mask_BT, signal.spans
    count = max(float(spans.start_BT.sum()), 1.0)
    return {
        "align_tokens_per_span": float(mask_BT.sum()) / count,
        "align_one_to_one": float(spans.one_to_one_BT.sum()) / count,
        "time_align_s": spans.align_s,
        "teacher_scored_tokens": spans.teacher_tokens,
    }


def teacher_pool(
    config: Config, task: Task, tokenizer, teacher, run_dir: Path, world: World
) -> tuple[ExampleStream, Cost]:
    """Teacher completions for the first ``pool_size`` training prompts, made once (their time and tokens
    count against the run) and reused every epoch; kept in the run directory (every rank makes it, rank 0
    writes it) so resume reuses them."""
    path = run_dir / "teacher_pool.jsonl"
    cached = path.is_file()
    world.barrier()  # every rank has looked before rank 0 writes
    if cached:
        return ExampleStream(read_jsonl(path), config.train.seed), Cost()
    started = time.perf_counter()
    examples = [task.train[i] for i in range(config.data.pool_size)]
    texts, ids = sample_completions(
        teacher.model,
        tokenizer,
        examples,
        max_new_tokens=config.rollout.max_new_tokens,
        temperature=config.data.teacher_temperature,
        seed=config.train.seed,
    )
    pool = [
        Example(prompt=ex.prompt, answer=ex.answer, completion=text, completion_ids=tuple(row))
        for ex, text, row in zip(examples, texts, ids, strict=True)
    ]
    if world.is_main:
        write_jsonl(pool, path)
    prompt_tokens = sum(len(ids) for ids in encode_prompts(tokenizer, pool))
    completion_tokens = sum(len(row) for row in ids)
    cost = Cost(time.perf_counter() - started, teacher_generated_tokens=prompt_tokens + completion_tokens)
    return ExampleStream(pool, config.train.seed), cost
