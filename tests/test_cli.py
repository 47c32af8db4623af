"""The `opd` command as a user runs it: a task of their own, bad inputs, interruption and resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from opdistill.cli.demo import asset_dir

TEACHER = str(asset_dir("addition-teacher"))


def opd(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "opdistill.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def _one_clear_sentence(proc: subprocess.CompletedProcess, text: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], proc.stderr


@pytest.fixture(scope="module")
def reverse_task(tmp_path_factory):
    """A task that is not built in: reverse a word. Train and eval JSONL files, as a user would write them."""
    import random

    root = tmp_path_factory.mktemp("reverse")
    rng = random.Random(0)
    for name, n in (("train", 400), ("eval", 50)):
        with (root / f"{name}.jsonl").open("w") as f:
            for i in range(n):
                word = "".join(rng.choice("abcdef") for _ in range(rng.randint(3, 6)))
                f.write(
                    json.dumps(
                        {
                            "id": f"{name}{i}",
                            "prompt": f"reverse {word}:",
                            "completion": word[::-1],
                            "answer": word[::-1],
                        }
                    )
                    + "\n"
                )
    return root


def test_own_jsonl_task_sft_distill_eval(tmp_path, reverse_task):
    data = [
        f"data.train_file={reverse_task / 'train.jsonl'}",
        f"data.eval_file={reverse_task / 'eval.jsonl'}",
        "data.answer_regex=([a-f]+)$",
        "rollout.max_new_tokens=12",
        "train.prompts_per_step=16",
        "train.eval_size=50",
    ]
    teacher = opd(
        "sft",
        *data,
        "student.preset=d32l2",
        "train.steps=30",
        "optim.lr=3e-3",
        f"train.out_dir={tmp_path / 't'}",
    )
    assert teacher.returncode == 0, teacher.stderr
    summary = json.loads(teacher.stdout)
    assert summary["steps"] == 30 and 0 <= summary["final_eval"]["greedy_acc"] <= 1
    student = opd("sft", *data, "student.preset=d16l1", "train.steps=5", f"train.out_dir={tmp_path / 's'}")
    assert student.returncode == 0, student.stderr
    distill = opd(
        "distill",
        *data,
        f"student.path={tmp_path / 's' / 'final'}",
        f"teacher.path={tmp_path / 't' / 'final'}",
        "train.steps=4",
        f"train.out_dir={tmp_path / 'd'}",
    )
    assert distill.returncode == 0, distill.stderr
    rows = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(
        "teacher_kl" in r and "truncation_rate" in r for r in rows
    )
    ev = opd(
        "eval",
        "--model",
        str(tmp_path / "d" / "final"),
        "--data",
        str(reverse_task / "eval.jsonl"),
        "--answer-regex",
        "([a-f]+)$",
        "--n",
        "4",
        "--k",
        "1,2,4",
    )
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert result["n_problems"] == 50 and set(result) >= {"greedy_acc", "avg@4", "pass@1", "pass@4"}
    assert result["pass@1"] == pytest.approx(result["avg@4"]) and result["pass@4"] >= result["pass@1"]
    shown = [line for line in ev.stderr.splitlines() if line.startswith("--- prompt: ")]
    verdicts = [
        line.split()[0] for line in ev.stderr.splitlines() if line.startswith("    ") and "greedy" not in line
    ]
    assert len(shown) == 3 and len(verdicts) == 3 and set(verdicts) <= {"correct", "wrong"}


def test_eval_and_tasks_on_the_builtin_task(tmp_path):
    ev = opd("eval", "--model", TEACHER, "--task", "addition", "--limit", "100", "--n", "6")
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert result["greedy_acc"] >= 0.9 and {"pass@1", "pass@2", "pass@4", "pass@6"} <= set(result)
    # the teacher is nearly deterministic on addition: about one distinct final answer per problem
    assert 1.0 <= result["distinct_answers"] < 1.5 and 0 < result["distinct_2"] <= 1
    assert 0 <= result["token_entropy"] < 0.2  # nearly deterministic, in nats
    listing = opd("tasks")
    assert listing.returncode == 0 and listing.stdout.startswith("addition")
    exported = opd(
        "tasks", "--export", "addition", "--split", "test", "--n", "3", "--out", str(tmp_path / "x.jsonl")
    )
    assert exported.returncode == 0
    lines = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and set(lines[0]) == {"prompt", "answer", "completion"}
    # a tagged second slice appended to the first on stdout: the multi-teacher recipe's data
    mixed = tmp_path / "mixed.jsonl"
    command = [sys.executable, "-m", "opdistill.cli", "tasks", "--export", "addition", "--n", "3"]
    with mixed.open("w") as handle:
        subprocess.run(command, stdout=handle, check=True)
    with mixed.open("a") as handle:
        subprocess.run(
            [*command, "--skip", "3", "--tag", "weak", "--task-option", "digits=2"], stdout=handle, check=True
        )
    rows = [json.loads(line) for line in mixed.read_text().splitlines()]
    assert [r.get("teacher", "") for r in rows] == ["", "", "", "weak", "weak", "weak"]
    assert len({r["prompt"] for r in rows}) == 6 and len(rows[-1]["prompt"]) == len("12+34=")


@pytest.mark.parametrize(
    "args,message",
    [
        (("sft", "train.stepz=3"), "unknown config key 'train.stepz'. Did you mean train.steps?"),
        (("sft", "--config", "missing.yaml"), "config file missing.yaml does not exist"),
        (("distill", f"teacher.path={TEACHER}", "teacher.path=/nonexistent"), "/nonexistent does not exist"),
        (("distill", "objective.type=sft"), "what `opd sft` runs"),
        (("sft", "data.task=sums"), "unknown task 'sums'"),
        (
            ("eval", "--model", TEACHER, "--task", "addition", "--n", "2", "--k", "4"),
            "every --k must be between 1 and --n",
        ),
        (("eval", "--model", "/nonexistent", "--task", "addition"), "/nonexistent does not exist"),
        (("report", "/nonexistent"), "not a run directory"),
        (("demo", "--budget-flops", "0"), "--budget-flops must be a positive number"),
    ],
)
def test_bad_input_is_one_clear_sentence(tmp_path, args, message):
    _one_clear_sentence(opd(*args, cwd=tmp_path), message)


def test_demo_gives_every_method_the_same_flop_budget_and_records_it(tmp_path):
    from opdistill.cli.demo import run_demo

    summary = run_demo(tmp_path / "demo", 3e9, seed=0, eval_n=20, prompts=16, show_progress=False)
    assert summary["budget_flops"] == 3e9 and summary["train_prompts"] == 16
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["budget_flops"] == 3e9
    for name in ("opd", "sft", "sft_pool"):
        rows = [
            json.loads(line) for line in (tmp_path / "demo" / name / "metrics.jsonl").read_text().splitlines()
        ]
        # each run stopped at the first step past the budget, and the summary counts what metrics.jsonl does
        assert rows[-1]["flops"] >= 3e9 > rows[-2]["flops"]
        assert summary["compute"][name]["flops"] == pytest.approx(rows[-1]["flops"])
    assert (
        summary["compute"]["sft_pool"]["steps"] > summary["compute"]["opd"]["steps"]
    )  # its steps are cheaper
    assert (tmp_path / "demo" / "report.html").is_file()


def test_malformed_data_line_and_tokenizer_mismatch(tmp_path, reverse_task):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 3}\n')
    _one_clear_sentence(
        opd("sft", f"data.train_file={bad}", f"train.out_dir={tmp_path / 'a'}"),
        f"{bad}:2: field 'completion' must be a string",
    )
    mismatch = opd(
        "distill",
        f"data.train_file={reverse_task / 'train.jsonl'}",
        f"teacher.path={TEACHER}",
        f"train.out_dir={tmp_path / 'b'}",
    )
    _one_clear_sentence(mismatch, "cannot write 11 of the student's tokens (e.g. [' ', ':', 'a'])")


def test_interrupted_run_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = [
        "distill",
        f"teacher.path={TEACHER}",
        "student.preset=d16l1",
        "train.steps=60",
        "train.prompts_per_step=8",
        "rollout.max_new_tokens=52",
        "train.eval_every=0",
        f"train.out_dir={out}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "opdistill.cli", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and (out / "checkpoints" / "latest").is_file()
    stopped = len((out / "metrics.jsonl").read_text().splitlines())
    assert 3 <= stopped < 60
    resumed = opd(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))


def test_objectives_lists_every_objective_with_its_teacher_signal():
    from opdistill.objectives.registry import OBJECTIVES

    listing = opd("objectives")
    assert listing.returncode == 0, listing.stderr
    rows = {
        line.split()[0]: line.split()[1:] for line in listing.stdout.splitlines()[1 : 1 + len(OBJECTIVES)]
    }
    assert set(rows) == set(OBJECTIVES)
    assert rows["sampled_rkl"][:2] == ["PG", "L0"] and rows["full_rkl"][:3] == ["direct", "L0", "L2"]
