"""Teacher-aligned prompt selection (math.md §11.3): the step-0 overlap score against a per-position
reference, its limits, the top-fraction cut, the per-step mix and the cached selection a resumed run reads."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from opdistill.cli.demo import asset_dir
from opdistill.config import Config, ModelSpec, replace
from opdistill.data.examples import Example, ExampleStream
from opdistill.data.rendering import encode_prompts
from opdistill.data.selection import SelectedStream, overlap_scores, selected_prompts, top_fraction
from opdistill.data.tasks import RegexVerifier, Task, load_task
from opdistill.models import load_model
from opdistill.teachers.local import LocalTeacher
from opdistill.types import Cost

PROMPTS = [
    Example(prompt=f"{a:02d}+{b:02d}=") for a, b in zip(range(3, 99, 7), range(90, 0, -6), strict=False)
]


class Untouchable:
    """Stands for a model that must not be used: any attribute raises."""

    def __getattr__(self, name):
        raise AssertionError(f"the cached selection used the model ({name})")


def test_a_teacher_identical_to_the_student_scores_one_and_another_less(make_model, tokenizer):
    student = make_model(seed=0, preset="d32l2").train()  # as in a run
    score = functools.partial(overlap_scores, topk=4, max_new_tokens=12, temperature=1.0, seed=0)
    same, _ = score(student, LocalTeacher(make_model(seed=0, preset="d32l2")), tokenizer, PROMPTS)
    assert same == [1.0] * len(PROMPTS)
    other, _ = score(student, LocalTeacher(make_model(seed=1, preset="d32l2")), tokenizer, PROMPTS)
    assert all(0.0 <= s <= 1.0 for s in other) and sum(other) / len(other) < 0.9
    # deterministic in the seed
    assert score(student, LocalTeacher(make_model(seed=1, preset="d32l2")), tokenizer, PROMPTS)[0] == other
    assert student.training  # scored in eval mode, then left as it was


def _reference_scores(
    student, teacher, prompts_BP: torch.Tensor, eos_id: int, k: int, steps: int
) -> list[float]:
    """Greedy decoding without a KV cache (equal-length prompts: no padding), then |TopK_S ∩ TopK_T| / k at
    each visited state from one full forward of each model, averaged over the response up to and including
    EOS."""
    ids_BL = prompts_BP
    for _ in range(steps):
        ids_BL = torch.cat([ids_BL, student(input_ids=ids_BL).logits[:, -1:].argmax(-1)], dim=1)
    P = prompts_BP.shape[1]
    student_BTK = student(input_ids=ids_BL).logits[:, P - 1 : -1].topk(k).indices
    teacher_BTK = teacher(input_ids=ids_BL).logits[:, P - 1 : -1].topk(k).indices
    scores = []
    for row in range(len(ids_BL)):
        response = ids_BL[row, P:].tolist()
        length = response.index(eos_id) + 1 if eos_id in response else steps
        shared = [
            len(set(student_BTK[row, t].tolist()) & set(teacher_BTK[row, t].tolist())) / k
            for t in range(length)
        ]
        scores.append(sum(shared) / length)
    return scores


@torch.no_grad()
def test_the_score_is_the_mean_overlap_over_the_students_response():
    student, tokenizer = load_model(ModelSpec(path=str(asset_dir("addition-student"))))
    teacher, _ = load_model(ModelSpec(path=str(asset_dir("addition-teacher"))))
    student.eval()
    teacher.eval()
    task = load_task(task="addition", task_options={"digits": 4})
    # answers of 4 and 5 digits: responses end at different positions, so the EOS mask matters
    first = [task.train[i] for i in range(12)]
    examples = [ex for ex in first if len(ex.answer) == 4][:2] + [ex for ex in first if len(ex.answer) == 5][
        :2
    ]
    scores, _ = overlap_scores(
        student,
        LocalTeacher(teacher),
        tokenizer,
        examples,
        topk=3,
        max_new_tokens=52,
        temperature=0.0,
        seed=0,
    )
    eos_id = tokenizer.eos_token_id
    assert isinstance(eos_id, int)
    expected = _reference_scores(
        student, teacher, torch.tensor(encode_prompts(tokenizer, examples)), eos_id, 3, 52
    )
    assert scores == pytest.approx(expected, abs=1e-6)
    assert 0.5 < sum(scores) / len(scores) < 1.0  # trained on the same task, yet not the same model


def test_the_top_fraction_is_the_best_scores_with_ties_in_pool_order():
    scores = [0.5, 0.9, 0.5, 0.9, 0.1]
    assert top_fraction(scores, 0.6) == [1, 3, 0]
    assert top_fraction(scores, 1.0) == [1, 3, 0, 2, 4]
    assert top_fraction(scores, 0.01) == [1]  # never empty


POOL = [Example(prompt=str(i)) for i in range(100)]
SELECTED = list(range(10))  # a tenth of the pool


@pytest.mark.parametrize("mix", [0.0, 0.3, 1.0])
def test_each_step_draws_the_mix_share_from_the_whole_pool(mix):
    stream = SelectedStream(POOL, SELECTED, mix, seed=0)
    # 7 prompts a step: 7 x 0.3 = 2.1 is not a whole number, so the share is exact only on average
    batches = [stream.batch(step, 7) for step in range(3000)]
    assert all(len(batch) == 7 for batch in batches)
    position = {ex: i for i, ex in enumerate(POOL)}
    drawn = [position[ex] for batch in batches for ex in batch]
    outside = sum(i not in SELECTED for i in drawn) / len(drawn)
    # a pool draw lands outside the selection 9 times in 10
    assert outside == pytest.approx(0.9 * mix, abs=0.005)
    if mix == 1.0:
        assert set(drawn) == set(range(100))
    else:
        assert set(SELECTED) <= set(drawn)


def test_a_batch_is_a_function_of_seed_and_step():
    stream, again = SelectedStream(POOL, SELECTED, 0.5, seed=0), SelectedStream(POOL, SELECTED, 0.5, seed=0)
    assert [stream.batch(s, 8) for s in (5, 2, 9)] == [again.batch(s, 8) for s in (5, 2, 9)]
    assert stream.batch(5, 8) != stream.batch(6, 8)
    assert stream.batch(5, 8) != SelectedStream(POOL, SELECTED, 0.5, seed=1).batch(5, 8)


def test_the_selection_is_written_once_and_a_resumed_run_reads_it(make_model, tokenizer, tmp_path):
    config = replace(
        Config(),
        data={"pool_size": 24, "select_fraction": 0.25, "select_topk": 4, "select_mix": 0.5},
        rollout={"max_new_tokens": 10},
        train={"seed": 3},
    )
    task = load_task(task="addition", task_options={"digits": 2}, seed=3)
    student, teacher = make_model(seed=0, preset="d32l2"), LocalTeacher(make_model(seed=1, preset="d32l2"))
    stream, cost = selected_prompts(config, task, tokenizer, student, teacher, tmp_path)

    rows = [json.loads(line) for line in (tmp_path / "selection.jsonl").read_text().splitlines()]
    pool = [task.train[i] for i in range(24)]
    assert [r["prompt"] for r in rows] == [ex.prompt for ex in pool]
    assert [r["answer"] for r in rows] == [ex.answer for ex in pool]
    scores, _ = overlap_scores(
        student, teacher, tokenizer, pool, topk=4, max_new_tokens=10, temperature=1.0, seed=3
    )
    assert [r["score"] for r in rows] == scores
    chosen = [i for i, r in enumerate(rows) if r["selected"]]
    assert chosen == sorted(top_fraction(scores, 0.25)) and len(chosen) == 6
    assert min(scores[i] for i in chosen) >= max(s for i, s in enumerate(scores) if i not in chosen)
    assert cost.elapsed_s > 0 and cost.student_sampled_tokens > 24
    assert cost.teacher_scored_tokens > cost.student_sampled_tokens

    resumed, resumed_cost = selected_prompts(config, task, tokenizer, Untouchable(), Untouchable(), tmp_path)
    assert resumed_cost == Cost()  # read back: nothing is charged twice
    assert resumed.pool == stream.pool and resumed.selected == stream.selected
    assert [resumed.batch(s, 8) for s in range(20)] == [stream.batch(s, 8) for s in range(20)]


def test_a_file_smaller_than_the_pool_is_scored_once_per_prompt(make_model, tokenizer, tmp_path):
    examples = [Example(prompt=f"{i}+{i}=", answer=str(2 * i)) for i in range(5)]
    task = Task("file", ExampleStream(examples, seed=0), [], RegexVerifier(r"\d+"))
    config = replace(Config(), data={"pool_size": 24, "select_fraction": 0.4}, rollout={"max_new_tokens": 4})
    student, teacher = make_model(seed=0), LocalTeacher(make_model(seed=1))
    stream, _ = selected_prompts(config, task, tokenizer, student, teacher, tmp_path)
    assert sorted(stream.pool, key=examples.index) == examples and len(stream.selected) == 2
