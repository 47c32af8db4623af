"""`opd generate`: validity filters (math.md §11.2) and teacher samples written as training data."""

from __future__ import annotations

import re

import pytest

from opdistill.cli import app
from opdistill.cli.demo import asset_dir
from opdistill.config import ModelSpec
from opdistill.data.examples import Example, read_jsonl, write_jsonl
from opdistill.data.rendering import completion_target, encode_completion
from opdistill.data.tasks import load_task
from opdistill.errors import UserError
from opdistill.models import load_model
from opdistill.sampling import generate as generation
from opdistill.sampling.generate import invalid_reason

TEACHER = str(asset_dir("addition-teacher"))


@pytest.mark.parametrize(
    "text,truncated,require,reason",
    [
        ("the answer is \\boxed{4}", False, r"\\boxed", None),
        ("the answer is \\boxed{4}", True, r"\\boxed", "truncated"),
        ("the answer is 4", False, r"\\boxed", "missing required pattern"),
        ("step\n" * 5 + "done", False, None, "repeated line"),
        ("step\n" * 4 + "done", False, None, None),  # four repeats are allowed
        ("\n\n\n\n\n\nx", False, None, None),  # blank lines do not count
        ("abcdefghij" * 12 + "-" + "abcdefghij" * 12 + "-" + "abcdefghij" * 12, False, None, "repeated span"),
        ("".join(chr(65 + i % 26) + str(i) for i in range(200)), False, None, None),
    ],
)
def test_validity_filters(text, truncated, require, reason):
    assert invalid_reason(text, truncated, re.compile(require) if require else None) == reason


def test_a_span_seen_twice_is_still_valid():
    span = "".join(chr(97 + i % 26) for i in range(100))
    assert invalid_reason(span + "|" + span, False) is None
    assert invalid_reason(span + "|" + span + "|" + span, False) == "repeated span"


def test_teacher_samples_become_training_data(tmp_path, capsys):
    out = tmp_path / "teacher.jsonl"
    code = app.main(
        [
            "generate",
            "--model",
            TEACHER,
            "--task",
            "addition",
            "--limit",
            "12",
            "--n",
            "2",
            "--temperature",
            "1",
            "--max-new-tokens",
            "52",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and "kept 24 of 24" in capsys.readouterr().err
    rows = read_jsonl(out)
    task = load_task(task="addition")
    assert [r.prompt for r in rows] == [task.train[i].prompt for i in range(12) for _ in range(2)]
    assert all(r.completion and r.answer for r in rows)
    assert sum(task.verify(r.completion, r) for r in rows) >= 20  # the teacher is right ~99% of the time
    assert load_task(train_file=str(out)).train[0].completion  # usable as data.train_file
    assert app.main(["generate", "--model", TEACHER, "--task", "addition", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_invalid_samples_are_redrawn_then_dropped_with_their_reason():
    model, tokenizer = load_model(ModelSpec(path=TEACHER))
    examples = [load_task(task="addition").train[i] for i in range(6)]
    drawn = []
    original = generation.sample_prompts

    def counting(*args, **kwargs):
        drawn.append(len(args[2]))
        return original(*args, **kwargs)

    generation.sample_prompts = counting
    try:
        kept, counts = generation.generate(
            model,
            tokenizer,
            examples,
            temperature=1.0,
            max_new_tokens=52,
            require=re.compile("never there"),
            max_retries=2,
        )
        greedy, greedy_counts = generation.generate(
            model, tokenizer, examples, max_new_tokens=10, max_retries=2
        )
    finally:
        generation.sample_prompts = original
    assert kept == [] and counts == {"missing required pattern": 6, "kept": 0}
    assert drawn[:3] == [6, 6, 6]  # the first try and two redraws of every sample
    assert drawn[3:] == [6]  # greedy: a redraw would repeat itself
    assert greedy == [] and greedy_counts == {"truncated": 6, "kept": 0}


def test_bad_arguments_are_one_sentence(tmp_path, capsys):
    out = str(tmp_path / "x.jsonl")
    assert (
        app.main(["generate", "--model", TEACHER, "--task", "addition", "--require", "(", "--out", out]) == 2
    )
    assert "not a regular expression" in capsys.readouterr().err
    assert app.main(["generate", "--model", TEACHER, "--task", "addition", "--n", "0", "--out", out]) == 2


def test_generated_completions_keep_the_sampled_ids_and_sft_trains_on_them(tmp_path):

    model, tokenizer = load_model(ModelSpec(path=TEACHER))
    examples = load_task("addition").test[:8]
    kept, _ = generation.generate(model, tokenizer, examples, n=2, temperature=1.0, max_new_tokens=52, seed=0)
    assert kept and all(ex.completion_ids for ex in kept)
    for ex in kept:
        ids = list(ex.completion_ids)
        assert ids[-1] == tokenizer.eos_token_id and tokenizer.decode(ids[:-1]) == ex.completion
        assert completion_target(tokenizer, ex) == ids
    write_jsonl(kept, tmp_path / "gen.jsonl")
    assert read_jsonl(tmp_path / "gen.jsonl") == kept  # the ids survive the file
    # without ids, the text is encoded after its prompt; ids that are not this tokenizer's are refused
    text_only = Example(prompt=kept[0].prompt, completion=kept[0].completion)
    assert completion_target(tokenizer, text_only) == encode_completion(
        tokenizer, kept[0].completion, kept[0].messages()
    )
    wrong = Example(prompt="1+1=", completion="2", completion_ids=(5, 6, tokenizer.eos_token_id))
    with pytest.raises(UserError, match="completion_ids do not decode to its completion"):
        completion_target(tokenizer, wrong)
