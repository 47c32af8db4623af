"""SEAD's competence-gated curriculum (math.md §7.7): the student's prompts, gated by how hard each was for
the student as the run started."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

from opdistill.config import Config
from opdistill.data.examples import Example
from opdistill.data.tasks import Task
from opdistill.objectives import weighting
from opdistill.observe.evaluate import sample_completions
from opdistill.training.distributed import World
from opdistill.types import Cost


class CurriculumStream:
    """SEAD's competence-gated curriculum (math.md §7.7, [D] form): step t draws, with replacement and
    as a function of (seed, t), only pool prompts whose difficulty d = 1 - the initial student's pass rate is
    at most c(t); when none is, the easiest ones."""

    def __init__(self, examples: list[Example], difficulty: list[float], config: Config):
        self.examples, self.difficulty, self.config = examples, difficulty, config

    def batch(self, step: int, size: int) -> list[Example]:
        data, train = self.config.data, self.config.train
        limit = max(weighting.sead_competence(step, train.steps, data.curriculum_start), min(self.difficulty))
        eligible = [ex for ex, d in zip(self.examples, self.difficulty, strict=True) if d <= limit]
        rng = random.Random(f"curriculum-{train.seed}-{step}")
        return [eligible[rng.randrange(len(eligible))] for _ in range(size)]


def curriculum(
    config: Config, task: Task, tokenizer, student, run_dir: Path, world: World
) -> tuple[CurriculumStream, Cost]:
    """The difficulty of the first ``data.pool_size`` training prompts for the student as the run starts,
    from ``data.curriculum_samples`` samples each (their time counts against the run); kept in the run
    directory (every rank computes it, rank 0 writes it), so a resumed run keeps the initial student's
    difficulties."""
    path = run_dir / "curriculum.jsonl"
    cached = path.is_file()
    world.barrier()  # every rank has looked before rank 0 writes
    if cached:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        examples = [Example(**r["example"]) for r in rows]
        return CurriculumStream(examples, [r["difficulty"] for r in rows], config), Cost()
    started = time.perf_counter()
    examples, n = [task.train[i] for i in range(config.data.pool_size)], config.data.curriculum_samples
    texts, ids = sample_completions(
        student,
        tokenizer,
        examples,
        max_new_tokens=config.rollout.max_new_tokens,
        temperature=config.rollout.temperature,
        n=n,
        seed=config.train.seed,
    )
    difficulty = [
        1 - sum(task.verify(texts[i * n + j], ex) for j in range(n)) / n for i, ex in enumerate(examples)
    ]
    if world.is_main:
        path.write_text(
            "".join(
                json.dumps({"example": dataclasses.asdict(ex), "difficulty": d}) + "\n"
                for ex, d in zip(examples, difficulty, strict=True)
            )
        )
    sampled_tokens = sum(len(row) for row in ids)
    cost = Cost(time.perf_counter() - started, student_sampled_tokens=sampled_tokens)
    return CurriculumStream(examples, difficulty, config), cost
