"""Off-policy cold start (math.md §11.2): valid teacher samples, an SFT that lowers the student's NLL on them,
the prompts it used, distillation streams that never see them, and a resumed run that does not train again."""

from __future__ import annotations

import json
import re

import pytest
import torch

from opdistill.cli.demo import asset_dir
from opdistill.config import Config, ModelSpec, replace
from opdistill.data.examples import Example, ExampleStream, prompt_key, read_jsonl, rollout_of
from opdistill.data.rendering import encode_completion, encode_prompts
from opdistill.data.tasks import corpus_text, load_task
from opdistill.errors import UserError
from opdistill.logits import completion_logits
from opdistill.models import load_model, tokenizer_fingerprint
from opdistill.objectives import losses
from opdistill.teachers.local import LocalTeacher
from opdistill.training.coldstart import SkippingStream, cold_start, disjoint
from opdistill.training.distributed import ONE_PROCESS
from opdistill.types import Cost

REQUIRE = r">1\d{4}$"  # a five-digit answer: about half of the 4-digit sums, the teacher's others are dropped
SAMPLES, STEPS = 32, 16


class Untouchable:
    """Stands for a model or function that must not be used: using it raises."""

    def __getattr__(self, name):
        raise AssertionError(f"a resumed cold start used {name}")

    def __call__(self, *args, **kwargs):
        raise AssertionError("a resumed cold start trained")


def _nll(model, tokenizer, examples: list[Example]) -> float:
    """The model's mean token NLL of the examples' completions (EOS included)."""
    completions = [encode_completion(tokenizer, ex.completion) for ex in examples]
    rollout = rollout_of(encode_prompts(tokenizer, examples), completions, tokenizer.pad_token_id)
    with torch.no_grad():
        logp_BT = losses.token_logprobs(completion_logits(model, rollout), rollout.tokens_BT)
    return losses.masked_mean(-logp_BT, rollout.loss_mask_BT)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One cold start of a fresh d32l2 student from the shipped teacher, and what it changed."""
    out = tmp_path_factory.mktemp("cold")
    config = replace(
        Config(),
        cold_start={
            "samples": SAMPLES,
            "steps": STEPS,
            "prompts_per_step": 16,
            "lr": 1e-2,
            "require": REQUIRE,
        },
        rollout={"max_new_tokens": 52},
    )
    task = load_task(task="addition", task_options={"digits": 4})
    student, tokenizer = load_model(ModelSpec(preset="d32l2"), corpus_text(task), seed=0)
    teacher, teacher_tokenizer = load_model(ModelSpec(path=str(asset_dir("addition-teacher"))))
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(teacher_tokenizer)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    keys, cost = cold_start(config, task, tokenizer, student, LocalTeacher(teacher), out, ONE_PROCESS)
    return dict(
        config=config,
        task=task,
        student=student,
        tokenizer=tokenizer,
        before=before,
        keys=keys,
        out=out,
        cost=cost,
    )


def test_kept_samples_are_valid_and_the_returned_prompts_are_theirs(run):
    kept = read_jsonl(run["out"] / "cold_start.jsonl")
    candidates = [run["task"].train[i] for i in range(SAMPLES)]
    # the filter acted: samples with a four-digit answer were redrawn, then dropped
    assert 8 <= len(kept) < SAMPLES
    assert all(re.search(REQUIRE, ex.completion) for ex in kept)
    by_key = {prompt_key(ex): ex for ex in candidates}
    assert all(by_key[prompt_key(ex)].answer == ex.answer for ex in kept)  # a candidate, with its fields
    assert run["keys"] == frozenset(prompt_key(ex) for ex in kept)
    assert run["cost"].elapsed_s > 0
    assert run["cost"].student_train_tokens > 0 and run["cost"].teacher_generated_tokens > 0


def test_sft_lowers_the_students_nll_on_the_samples(run):
    kept = read_jsonl(run["out"] / "cold_start.jsonl")
    initial = load_model(ModelSpec(preset="d32l2"), corpus_text(run["task"]), seed=0)[0]
    assert _nll(run["student"], run["tokenizer"], kept) < _nll(initial, run["tokenizer"], kept) - 0.3
    records = [
        json.loads(line) for line in (run["out"] / "cold_start_metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    assert records[0]["lr"] == pytest.approx(1e-3) and records[-1]["lr"] == pytest.approx(1e-2)  # warmup


def test_a_resumed_run_reads_the_prompts_back_without_training(run):
    weights = {name: p.detach().clone() for name, p in run["student"].named_parameters()}
    assert any(not torch.equal(weights[name], run["before"][name]) for name in weights)  # the SFT trained
    keys, cost = cold_start(
        run["config"],
        run["task"],
        run["tokenizer"],
        run["student"],
        Untouchable(),
        run["out"],
        ONE_PROCESS,
        resume=True,
    )
    assert keys == run["keys"] and cost == Cost()  # read back: nothing is charged twice
    assert all(torch.equal(p, weights[name]) for name, p in run["student"].named_parameters())
    with pytest.raises(UserError, match="cold_start.jsonl"):
        cold_start(
            run["config"],
            run["task"],
            run["tokenizer"],
            None,
            None,
            run["out"] / "none",
            ONE_PROCESS,
            resume=True,
        )


def test_a_sample_without_eos_is_not_kept(run, tmp_path):
    # 41 tokens hold a four-digit answer and its EOS, a five-digit one without its EOS: every sample that
    # matches REQUIRE is truncated, so none is valid
    config = replace(run["config"], cold_start={"samples": 8}, rollout={"max_new_tokens": 41})
    teacher = LocalTeacher(load_model(ModelSpec(path=str(asset_dir("addition-teacher"))))[0])
    with pytest.raises(UserError, match=r"kept none of the teacher's 8 samples .*\d truncated"):
        cold_start(config, run["task"], run["tokenizer"], run["student"], teacher, tmp_path, ONE_PROCESS)
    assert not (tmp_path / "cold_start.jsonl").exists()


def test_a_teacher_that_cannot_sample_is_refused(run, tmp_path):
    with pytest.raises(UserError, match="remote teacher"):
        cold_start(
            run["config"], run["task"], run["tokenizer"], run["student"], object(), tmp_path, ONE_PROCESS
        )


def test_an_endless_stream_skips_the_excluded_prompts_and_keeps_its_order():
    task = load_task(
        task="addition", task_options={"digits": 2}
    )  # ~9k problems: an endless stream repeats them
    excluded = frozenset(prompt_key(task.train[i]) for i in range(200))
    stream = disjoint(task.train, excluded)
    assert isinstance(stream, SkippingStream)
    batches = [stream.batch(step, 16) for step in range(300)]
    seen = [ex for batch in batches for ex in batch]
    assert not any(prompt_key(ex) in excluded for ex in seen)
    expected = [ex for ex in (task.train[j] for j in range(6000)) if prompt_key(ex) not in excluded][
        : len(seen)
    ]
    assert seen == expected  # the excluded ones recur after the first 200 and are skipped there too
    assert len(seen) < 6000 - 200
    fresh = disjoint(task.train, excluded)  # a resumed run reads from any step, in any order
    assert [fresh.batch(s, 16) for s in (250, 120, 3, 299)] == [batches[s] for s in (250, 120, 3, 299)]


def test_a_file_stream_keeps_the_remaining_examples():
    examples = [Example(prompt=f"{i}+{i}=", answer=str(2 * i)) for i in range(30)]
    excluded = frozenset(prompt_key(ex) for ex in examples[:10])
    stream = disjoint(ExampleStream(examples, seed=4), excluded)
    seen = [ex for step in range(50) for ex in stream.batch(step, 4)]
    assert set(seen) == set(examples[10:])  # every remaining example, none excluded
    assert [stream.batch(s, 4) for s in (7, 2)] == [
        disjoint(ExampleStream(examples, 4), excluded).batch(s, 4) for s in (7, 2)
    ]
    with pytest.raises(UserError, match="cold start"):
        disjoint(ExampleStream(examples, seed=4), frozenset(prompt_key(ex) for ex in examples))


def test_a_stream_with_nothing_left_is_an_error_not_a_hang():
    task = load_task(task="addition", n_train_prompts=5)
    stream = disjoint(task.train, frozenset(prompt_key(task.train[i]) for i in range(5)))
    with pytest.raises(UserError, match="cold-start prompts"):
        stream.batch(0, 1)


def test_prompt_keys():
    assert prompt_key(Example(prompt="12+3=")) == "12+3="
    assert prompt_key(Example(prompt=(("user", "12+3="),))) == "12+3="  # the same prompt as its text
    chat = Example(prompt=(("system", "add"), ("user", "12+3=")))
    assert prompt_key(chat) == prompt_key(Example(prompt=(("system", "add"), ("user", "12+3="))))
    assert prompt_key(chat) != prompt_key(Example(prompt=(("system", "add."), ("user", "12+3="))))
    assert prompt_key(chat) != "12+3="
