"""`opd demo`: on-policy distillation vs two SFT baselines at equal compute, from shipped assets.

Three runs share one recipe (recipes/demo.yaml), one student warm start, one teacher, the same few training
prompts (256 by default: the regime where OPD wins, docs/science.md S1) and one budget of counted FLOPs,
student and teacher (observe/flops.py), so the table does not depend on the machine's speed:
  opd       the student samples, the teacher scores every token (full-vocabulary reverse KL)
  sft       SFT on *fresh* teacher samples (temperature 1) of the step's prompts, paid every step
  sft_pool  SFT on a cached pool of the teacher's greedy completions reused for many epochs (making the
            pool counts)
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from opdistill.config import ModelSpec, load_config, replace, save_config
from opdistill.data.tasks import task_from_config
from opdistill.errors import UserError
from opdistill.models import load_model
from opdistill.observe.diagnostics import gap_recovery
from opdistill.observe.evaluate import evaluate
from opdistill.observe.flops import FlopCounter
from opdistill.observe.report import write_report
from opdistill.training import loop

ASSETS = resources.files("opdistill") / "assets"
RUNS = {
    "opd": ("student samples, teacher scores every token", {"objective": {"type": "full_rkl"}}),
    "sft": (
        "SFT, fresh teacher samples (T=1) every step",
        {"objective": {"type": "sft"}, "data": {"completions": "teacher", "teacher_temperature": 1.0}},
    ),
    "sft_pool": (
        "SFT, cached teacher pool reused",
        {"objective": {"type": "sft"}, "data": {"completions": "teacher_pool"}},
    ),
}


def asset_dir(name: str) -> Path:
    path = Path(str(ASSETS / name))
    if not (path / "config.json").is_file():
        raise UserError(f"shipped asset {name} is missing from {ASSETS}; rebuild it with `make assets`.")
    return path


# FLOPs per token of each method's step, in units of (student N, teacher N): train 6N (+2N sampling on
# policy), the teacher 2N per token it scores or writes; used only to space each run's evaluations
COST = {"opd": (8, 2), "sft": (6, 2), "sft_pool": (6, 0)}
EVALS = 6


def run_demo(
    run_dir: Path,
    budget_flops: float,
    seed: int,
    eval_n: int,
    teacher: Path | None = None,
    student: Path | None = None,
    prompts: int = 256,
    show_progress: bool = True,
) -> dict:
    started = time.perf_counter()
    console = Console(stderr=True)
    if not console.is_terminal:  # logs and pipes: wide enough that the table does not wrap
        console = Console(stderr=True, width=140)
    if not 0 < budget_flops < float("inf") or prompts < 0 or eval_n < 1:
        raise UserError(
            f"--budget-flops must be a positive number, --prompts >= 0 and --eval-n >= 1, not "
            f"{budget_flops:g}, {prompts} and {eval_n}."
        )
    if (run_dir / "summary.json").exists():
        raise UserError(f"{run_dir} already holds a demo; choose another --out or remove it.")
    recipe = resources.files("opdistill") / "recipes" / "demo.yaml"
    base = load_config(
        str(recipe),
        [
            f"student.path={student or asset_dir('addition-student')}",
            f"teacher.path={teacher or asset_dir('addition-teacher')}",
            f"train.budget_flops={budget_flops}",
            f"train.seed={seed}",
            *([f"data.n_train_prompts={prompts}", f"data.pool_size={prompts}"] if prompts else []),
        ],
    )
    task = task_from_config(base.data, seed)
    test = task.test[:eval_n]
    max_new = base.rollout.max_new_tokens

    def accuracy(path: Path, params_key: str = "") -> float:
        model, tokenizer = load_model(ModelSpec(path=str(path)))
        if params_key:
            summary[params_key] = sum(p.numel() for p in model.parameters())
        return evaluate(model, tokenizer, test, task.verify, max_new_tokens=max_new)["greedy_acc"]

    summary: dict = {
        "eval_problems": len(test),
        "budget_flops": budget_flops,
        "seed": seed,
        "train_prompts": prompts or None,
    }
    summary["teacher_acc"] = accuracy(Path(base.teacher.path), "teacher_params")
    summary["student_before_acc"] = accuracy(Path(base.student.path), "student_params")
    console.print(
        f"teacher {summary['teacher_acc']:.3f}, student before {summary['student_before_acc']:.3f} on "
        f"{len(test)} held-out problems; {budget_flops:.2g} FLOPs of training per method"
        + (f" on {prompts} prompts" if prompts else "")
    )
    compute = {}
    flops = FlopCounter(summary["student_params"], summary["teacher_params"])
    tokens_per_step = base.train.prompts_per_step * base.rollout.n_per_prompt * (max_new + 1)
    for name, (_, sections) in RUNS.items():
        student_cost, teacher_cost = COST[name]
        per_token = student_cost * summary["student_params"] + teacher_cost * summary["teacher_params"]
        steps = budget_flops / (per_token * tokens_per_step)
        train = {"out_dir": str(run_dir / name), "eval_every": max(1, round(steps / EVALS))}
        result = loop.run(replace(base, **sections, train=train), show_progress=show_progress)
        if not result["complete"]:  # Ctrl-C: the run checkpointed itself; the comparison is void
            raise KeyboardInterrupt
        summary[f"{name}_acc"] = accuracy(run_dir / name / "final")
        compute[name] = {key: result[key] for key in ("steps", "elapsed_s", *loop.COUNTERS)}
        compute[name]["flops"] = flops.total(result)
    summary["student_train_tokens"] = {n: c["student_train_tokens"] for n, c in compute.items()}
    summary["teacher_tokens"] = {
        n: c["teacher_scored_tokens"] + c["teacher_generated_tokens"] for n, c in compute.items()
    }
    summary["compute"] = compute
    summary["wall_s"] = time.perf_counter() - started
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    save_config(base, run_dir / "config.yaml")
    table = _table(summary)
    console.print(table)
    write_report(
        {n: run_dir / n for n in RUNS},
        run_dir,
        "opdistill demo: OPD vs SFT at equal compute",
        _html_table(summary),
    )
    console.print(f"run directory {run_dir}: summary.json, report.html ({summary['wall_s']:.0f} s in all)")
    return summary


def _rows(summary: dict) -> list[tuple[str, ...]]:
    blank = ("",) * (len(HEADERS) - 3)
    rows: list[tuple[str, ...]] = [
        (
            "teacher",
            f"{summary['teacher_params'] / 1e3:.0f}k params",
            f"{summary['teacher_acc']:.3f}",
            *blank,
        ),
        (
            "student before",
            f"warm start, {summary['student_params'] / 1e3:.0f}k params",
            f"{summary['student_before_acc']:.3f}",
            *blank,
        ),
    ]
    for name, (regime, _) in RUNS.items():
        c, acc = summary["compute"][name], summary[f"{name}_acc"]
        gap = gap_recovery(acc, summary["student_before_acc"], summary["teacher_acc"])
        rows.append(
            (
                name,
                regime,
                f"{acc:.3f}",
                "" if gap is None else f"{gap:.0%}",
                str(c["steps"]),
                f"{c['student_train_tokens'] / 1e6:.2f}M / {summary['teacher_tokens'][name] / 1e6:.2f}M",
                f"{c['flops']:.2e}",
                f"{c['elapsed_s']:.0f} s",
            )
        )
    return rows


HEADERS = ("model", "regime", "accuracy", "gap closed", "steps", "tokens student/teacher", "FLOPs", "time")


def _budget(summary: dict) -> str:
    prompts = summary["train_prompts"]
    return f"{summary['budget_flops']:.2g} FLOPs of training each, " + (
        f"on the same {prompts} prompts" if prompts else "a fresh prompt every time"
    )


def _table(summary: dict) -> Table:
    table = Table(
        title=f"greedy accuracy on {summary['eval_problems']} held-out problems, {_budget(summary)}",
        caption="gap closed: (after - before) / (teacher - before) · tokens: through the student's "
        "forward+backward / generated or scored by the teacher (pool included) · time: training, "
        "evaluation excluded",
    )
    for header in HEADERS:
        table.add_column(header)
    for row in _rows(summary):
        table.add_row(*row)
    return table


def _html_table(summary: dict) -> str:
    head = "".join(f"<th>{h}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in _rows(summary))
    return f"<table><tr>{head}</tr>{body}</table>"
