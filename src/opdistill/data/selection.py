"""Teacher-aligned prompt selection (math.md §11.3, [D] score): rank a pool of training prompts by how
well the initial student's top-k agrees with the teacher's along the student's own rollout, keep the top
share, and mix it with prompts drawn from the whole pool, so the student is not trained on the teacher's
favourite prompts alone (which collapses its entropy, Li, Zuo, He et al. 2026).

score(x) = mean over the response tokens t of one student rollout of |TopK_S(t) ∩ TopK_T(t)| / k.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from opdistill.config import Config
from opdistill.data.examples import Example, parse_record, prompt_key
from opdistill.data.rendering import encode_prompts
from opdistill.data.tasks import Task
from opdistill.logits import CHUNK_TOKENS, topk_ids
from opdistill.observe.diagnostics import topk_overlap
from opdistill.sampling.rollout import sample_prompts
from opdistill.training.distributed import ONE_PROCESS, World
from opdistill.types import Cost, Rollout, SignalRequest


@torch.no_grad()
def overlap_scores(
    student,
    teacher,
    tokenizer,
    examples: Sequence[Example],
    *,
    topk: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 256,
    chunk_tokens: int = CHUNK_TOKENS,
) -> tuple[list[float], dict[str, int]]:
    """score(x) of math.md §11.3 for each example, in [0, 1]: one rollout of ``student`` (an HF model) per
    prompt, then the mean top-``topk`` overlap (``diagnostics.topk_overlap``) of student and ``teacher``
    (anything with ``Teacher.score``: a local or remote teacher that serves its top-K) over the rollout's loss
    tokens (EOS included). ``topk`` is capped at the vocabulary. Deterministic in ``seed``. Also returns the
    run's token counters it adds to (the student's samples, the teacher's scoring)."""
    generator = torch.Generator().manual_seed(seed)
    scores: list[float] = []
    tokens = {"student_sampled_tokens": 0, "teacher_scored_tokens": 0}
    for start in range(0, len(examples), batch_size):
        prompts = encode_prompts(tokenizer, examples[start : start + batch_size])
        rollout = sample_prompts(
            student,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            generator=generator,
        )
        scores.extend(_rollout_overlap(student, teacher, rollout, topk, chunk_tokens))
        tokens["student_sampled_tokens"] += int(rollout.loss_mask_BT.sum())
        tokens["teacher_scored_tokens"] += int(rollout.attention_mask.sum())
    return scores, tokens


def _rollout_overlap(student, teacher, rollout: Rollout, topk: int, chunk_tokens: int) -> list[float]:
    """Per-row mean overlap of one rollout: the student's top-K ids a chunk of logits at a time
    (logits.py), the teacher's from its own scoring."""
    k = min(topk, student.config.vocab_size)
    was_training = student.training
    student.eval()
    try:
        student_ids_BTK = topk_ids(student, rollout, k, chunk_tokens)
    finally:
        student.train(was_training)
    teacher_ids_BTK = teacher.score(rollout, SignalRequest(topk=k)).topk_ids_BTK
    overlap_BT = topk_overlap(student_ids_BTK, teacher_ids_BTK.to(student_ids_BTK.device))
    mask_BT = rollout.loss_mask_BT.float()  # at least the first token (EOS or not) of every row
    return ((overlap_BT * mask_BT).sum(1) / mask_BT.sum(1).clamp(min=1)).tolist()


def top_fraction(scores: Sequence[float], fraction: float) -> list[int]:
    """Indices of the ``max(1, round(fraction x n))`` highest scores, best first; equal scores keep pool
    order."""
    count = max(1, round(fraction * len(scores)))
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:count]


class SelectedStream:
    """Each step's prompts (math.md §11.3): a share ``mix`` drawn uniformly from the whole pool, the rest
    from the selected prompts, both with replacement, as a function of (seed, step) so resume replays them.
    ``size x mix`` is rounded stochastically (floor, plus one with probability its fraction), so the share is
    exact on average for any batch size; the two parts are shuffled together, so every rank's shard mixes."""

    def __init__(self, pool: list[Example], selected: list[int], mix: float, seed: int):
        if not pool or not selected:
            raise ValueError("prompt selection needs a non-empty pool and selection")
        self.pool, self.selected, self.mix, self.seed = pool, selected, mix, seed

    def batch(self, step: int, size: int) -> list[Example]:
        rng = random.Random(f"select-{self.seed}-{step}")
        share = size * self.mix
        from_pool = int(share) + (rng.random() < share - int(share))
        picks = [rng.randrange(len(self.pool)) for _ in range(from_pool)]
        picks += [self.selected[rng.randrange(len(self.selected))] for _ in range(size - from_pool)]
        rng.shuffle(picks)
        return [self.pool[i] for i in picks]


def selected_prompts(
    config: Config,
    task: Task,
    tokenizer,
    student,
    teacher,
    run_dir: Path,
    world: World = ONE_PROCESS,
) -> tuple[SelectedStream, Cost]:
    """The selection over the distinct prompts among the first ``data.pool_size`` training ones, scored by the
    student as it is now (call it before the first step) against ``teacher`` at ``data.select_topk``, on one
    rollout per prompt at ``rollout.temperature``. Every rank computes it, rank 0 writes
    ``run_dir/selection.jsonl`` (one line per pool prompt: the example's fields, ``score``, ``selected``); a
    run that finds the file reads it back, so a resumed run keeps the initial student's selection. Returns the
    stream and what making it cost (nothing when read back), which counts against the run as the curriculum's
    does."""
    data = config.data
    path = run_dir / "selection.jsonl"
    cached = path.is_file()
    world.barrier()  # every rank has looked before rank 0 writes
    if cached:
        return read_selection(path, data.select_mix, config.train.seed), Cost()
    started = time.perf_counter()
    distinct: dict[str, Example] = {}
    for i in range(data.pool_size):  # a small file repeats itself: each prompt is scored once
        example = task.train[i]
        distinct.setdefault(prompt_key(example), example)
    pool = list(distinct.values())
    scores, tokens = overlap_scores(
        student,
        teacher,
        tokenizer,
        pool,
        topk=data.select_topk,
        max_new_tokens=config.rollout.max_new_tokens,
        temperature=config.rollout.temperature,
        seed=config.train.seed,
        chunk_tokens=config.train.chunk_tokens,
    )
    selected = top_fraction(scores, data.select_fraction)
    if world.is_main:
        chosen = set(selected)
        path.write_text(
            "".join(
                json.dumps({**example_record(ex), "score": s, "selected": i in chosen}) + "\n"
                for i, (ex, s) in enumerate(zip(pool, scores, strict=True))
            )
        )
    cost = Cost(time.perf_counter() - started, **tokens)
    return SelectedStream(pool, selected, data.select_mix, config.train.seed), cost


def read_selection(path: Path, mix: float, seed: int) -> SelectedStream:
    """The stream ``selected_prompts`` wrote to ``path`` (the selected prompts best first, as it chose
    them)."""
    pool, scores, chosen = [], [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        record = json.loads(line)
        scores.append(record.pop("score"))
        if record.pop("selected"):
            chosen.append(len(pool))
        pool.append(parse_record(record, f"{path}:{number}"))
    return SelectedStream(pool, sorted(chosen, key=lambda i: (-scores[i], i)), mix, seed)


def example_record(example: Example) -> dict:
    """An example as a JSONL object (``data.write_jsonl``'s layout: chat prompts as message lists)."""
    record: dict = {"prompt": example.prompt if isinstance(example.prompt, str) else example.messages()}
    for name in ("answer", "completion", "privileged", "id", "teacher"):
        if getattr(example, name):
            record[name] = getattr(example, name)
    return record
