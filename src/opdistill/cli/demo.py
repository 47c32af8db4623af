"""`opd demo`: on-policy distillation vs two SFT baselines at equal training time, from shipped assets.

Three runs share one recipe (recipes/demo.yaml), one student warm start, one teacher and one budget of
training seconds (evaluation excluded):
  opd       the student samples, the teacher scores every token (full-vocabulary reverse KL)
  sft       SFT on *fresh* teacher completions generated every step; the teacher's generation is paid
            per example, as it would be with a large teacher
  sft_pool  SFT on a cached pool of teacher completions reused for many epochs (making the pool counts)
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
from opdistill.observe.report import write_report
from opdistill.training import loop

ASSETS = resources.files("opdistill") / "assets"
RUNS = {
    "opd": ("student samples, teacher scores every token", {"objective": {"type": "full_rkl"}}),
    "sft": (
        "SFT, fresh teacher samples every step",
        {"objective": {"type": "sft"}, "data": {"completions": "teacher"}},
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


def run_demo(
    run_dir: Path,
    budget_s: float,
    seed: int,
    eval_n: int,
    teacher: Path | None = None,
    student: Path | None = None,
    prompts: int = 0,
    show_progress: bool = True,
) -> dict:
    started = time.perf_counter()
    console = Console(stderr=True)
    if not console.is_terminal:  # logs and pipes: wide enough that the table does not wrap
        console = Console(stderr=True, width=140)
    if (run_dir / "summary.json").exists():
        raise UserError(f"{run_dir} already holds a demo; choose another --out or remove it.")
    recipe = resources.files("opdistill") / "recipes" / "demo.yaml"
    base = load_config(
        str(recipe),
        [
            f"student.path={student or asset_dir('addition-student')}",
            f"teacher.path={teacher or asset_dir('addition-teacher')}",
            f"train.time_budget_s={budget_s}",
            f"train.eval_every_s={budget_s / 6}",
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
        "budget_s": budget_s,
        "seed": seed,
        "train_prompts": prompts or None,
    }
    summary["teacher_acc"] = accuracy(Path(base.teacher.path), "teacher_params")
    summary["student_before_acc"] = accuracy(Path(base.student.path), "student_params")
    console.print(
        f"teacher {summary['teacher_acc']:.3f}, student before {summary['student_before_acc']:.3f} on "
        f"{len(test)} held-out problems; {budget_s:.0f} s of training per method"
    )
    compute = {}
    for name, (_, sections) in RUNS.items():
        config = replace(
            base, **sections, train={**sections.get("train", {}), "out_dir": str(run_dir / name)}
        )
        result = loop.run(config, show_progress=show_progress)
        if not result["complete"]:  # Ctrl-C: the run checkpointed itself; the comparison is void
            raise KeyboardInterrupt
        summary[f"{name}_acc"] = accuracy(run_dir / name / "final")
        compute[name] = {key: result[key] for key in ("steps", "elapsed_s", *loop.COUNTERS)}
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
        "opdistill demo: OPD vs SFT at equal training time",
        _html_table(summary),
    )
    console.print(f"run directory {run_dir}: summary.json, report.html ({summary['wall_s']:.0f} s in all)")
    return summary


def _rows(summary: dict) -> list[tuple[str, ...]]:
    rows = [
        (
            "teacher",
            f"{summary['teacher_params'] / 1e3:.0f}k params",
            f"{summary['teacher_acc']:.3f}",
            "",
            "",
            "",
        ),
        (
            "student before",
            f"warm start, {summary['student_params'] / 1e3:.0f}k params",
            f"{summary['student_before_acc']:.3f}",
            "",
            "",
            "",
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
            )
        )
    return rows


HEADERS = ("model", "regime", "accuracy", "gap closed", "steps", "tokens student/teacher")


def _table(summary: dict) -> Table:
    table = Table(
        title=f"greedy accuracy on {summary['eval_problems']} held-out problems, "
        f"{summary['budget_s']:.0f} s of training each",
        caption="gap closed: (after - before) / (teacher - before) · tokens: through the student's "
        "forward+backward / generated or scored by the teacher (pool included)",
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
