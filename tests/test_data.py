"""JSONL parsing errors, deterministic streams, the addition task and verifiers."""

from __future__ import annotations

import json

import pytest

from opdistill.data.examples import Example, ExampleStream, read_jsonl, write_jsonl
from opdistill.data.tasks import RegexVerifier, function_verifier, load_task
from opdistill.data.tasks.addition import is_test, problem
from opdistill.errors import UserError


def _write(tmp_path, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", ":2: not valid JSON"),
        ("[1, 2]", ":2: each line must be a JSON object"),
        ('{"answer": "3"}', ":2: field 'prompt' is missing"),
        ('{"prompt": 5}', ":2: field 'prompt' must be a non-empty string"),
        ('{"prompt": "a", "answr": "3"}', ":2: unknown field 'answr'"),
        ('{"prompt": "a", "completion": ["x"]}', ":2: field 'completion' must be a string"),
        ('{"prompt": [{"role": "robot", "content": "x"}]}', ":2: field 'prompt'[0]: role must be"),
    ],
)
def test_malformed_line_names_file_line_and_field(tmp_path, line, message):
    path = _write(tmp_path, ['{"prompt": "ok", "answer": "1"}', line])
    with pytest.raises(UserError) as err:
        read_jsonl(path)
    assert str(path) + message in str(err.value)


def test_jsonl_round_trip_with_chat_messages(tmp_path):
    examples = [
        Example(prompt="2+2=", answer="4", completion="4", id="a"),
        Example(prompt=(("system", "be brief"), ("user", "hi")), privileged="secret"),
    ]
    write_jsonl(examples, tmp_path / "x.jsonl")
    assert read_jsonl(tmp_path / "x.jsonl") == examples
    assert json.loads((tmp_path / "x.jsonl").read_text().splitlines()[0]) == {
        "prompt": "2+2=",
        "answer": "4",
        "completion": "4",
        "id": "a",
    }


def test_stream_is_deterministic_and_covers_each_epoch():
    examples = [Example(prompt=str(i)) for i in range(10)]
    a, b = ExampleStream(examples, seed=1), ExampleStream(examples, seed=1)
    assert [a[i] for i in range(25)] == [b[i] for i in reversed(range(25))][::-1]
    assert sorted(ex.prompt for ex in a.batch(1, 10)) == [str(i) for i in range(10)]
    assert a.batch(0, 10) != ExampleStream(examples, seed=2).batch(0, 10)


def test_addition_problem_and_verifier():
    ex = problem(4721, 389, 4)
    assert ex.prompt == "4721+0389="
    assert ex.completion == "1+9+0=10,2+8+1=11,7+3+1=11,4+0+1=05>5110"
    assert ex.answer == "5110"
    assert problem(9999, 1, 4).completion.endswith("9+0+1=10>10000")
    task = load_task(task="addition", seed=0)
    assert task.verify(ex.completion, ex) and not task.verify(ex.completion.replace(">5110", ">5111"), ex)


def test_addition_splits_are_disjoint_and_deterministic():
    task = load_task(task="addition", task_options={"digits": 4, "test_size": 500}, seed=7)
    train_prompts = {task.train[i].prompt for i in range(3000)}
    test_prompts = {ex.prompt for ex in task.test}
    assert len(test_prompts) == 500 and not train_prompts & test_prompts
    assert all(is_test(p) for p in test_prompts)
    assert [ex.prompt for ex in load_task(task="addition", seed=99).test[:500]] == [
        ex.prompt for ex in task.test
    ]
    assert task.train[5] == load_task(task="addition", seed=7).train[5]


def test_regex_and_function_verifiers(tmp_path, monkeypatch):
    ex = Example(prompt="q", answer="42")
    assert RegexVerifier(r"-?\d+")("so 7 then 42", ex)
    assert not RegexVerifier(r"-?\d+")("42 then 7", ex)
    assert RegexVerifier(r"answer: (\w+)")("answer: 42", ex)
    assert not RegexVerifier(r"\d+")("no digits", ex)
    (tmp_path / "my_checks.py").write_text(
        "def same(completion, example):\n    return completion == example.answer\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert function_verifier("my_checks:same")("42", ex) and not function_verifier("my_checks:same")("4", ex)
    with pytest.raises(UserError, match="cannot import verifier"):
        function_verifier("nope_module:f")
    with pytest.raises(UserError, match="does not compile"):
        RegexVerifier("(")


def test_unknown_task_and_bad_options():
    with pytest.raises(UserError, match="unknown task 'sum'"):
        load_task(task="sum")
    with pytest.raises(UserError, match="data.task_options.digitz is not an option of task 'addition'"):
        load_task(task="addition", task_options={"digitz": 3})
    with pytest.raises(UserError, match="task_options.digits must be a int, like its default 4; got True"):
        load_task(task="addition", task_options={"digits": True})
    with pytest.raises(UserError, match="bad data.task_options for task 'addition': digits must be between"):
        load_task(task="addition", task_options={"digits": 0})


def test_eval_file_without_answers_is_refused_unless_a_verifier_decides(tmp_path):
    train = _write(tmp_path, ['{"prompt": "a", "completion": "b"}'])
    evals = tmp_path / "eval.jsonl"
    evals.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(UserError, match="eval.jsonl:2: field 'answer' is missing"):
        load_task(train_file=str(train), eval_file=str(evals))
    assert len(load_task(train_file=str(train), eval_file=str(evals), verifier="os.path:exists").test) == 2
