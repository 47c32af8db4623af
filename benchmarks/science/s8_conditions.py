"""S8: when does OPD work? Rethinking OPD (Li, Zuo, He et al. 2026) names two conditions: (i) the student and
the teacher share a thinking pattern, and (ii) the teacher has something new to teach; an off-policy cold
start and teacher-aligned prompt selection recover a failing run; and the monitor's no_progress alarm
should fire in the failing regime (docs/science.md, docs/metrics.md#alarms-alarmsjsonl).

    python benchmarks/science/s8_conditions.py [--budget-flops 7.2e11] [--seed 0]
    python benchmarks/science/s8_conditions.py --smoke      # the machinery at a tiny size (tests)

Every run has the recipe of `opd demo`, the same --budget-flops, 4-digit addition (a fresh problem each
time) and, but for `tiny`, the shipped 34k-parameter student warm start. Runs:
  control      the shipped 133k-parameter teacher
  swap         a teacher of the shipped teacher's size and recipe, trained here on the same problems written
               with each step's operands swapped (task option swap=true: `9+1+0=10` for `1+9+0=10`): an
               equally good teacher in a format the student does not share, condition (i)
  peer         a teacher no better than the student: the student's own recipe with another seed, (ii)
  self         the shipped student as its own teacher: nothing new to teach at all, (ii) at its limit
  swap_cold    swap after an off-policy cold start: SFT on --cold-samples (1024) teacher samples first
               (cold_start.samples; its FLOPs count against the budget)
  swap_select  swap on teacher-aligned prompts: the top --select-fraction (0.25) of a 4096-prompt pool by
               the step-0 top-k overlap (data.select_fraction; half of each batch still drawn at random)
  tiny         a fresh 1k-parameter student (d8l1) under the shipped teacher: too small for the task
Teachers are trained once into --teachers (shared with S7). Each run keeps its alarms.jsonl; the table
shows which alarms fired and the plot marks them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
import torch

from opdistill.cli.demo import asset_dir
from opdistill.config import Config, load_config

K = 3  # the diagnostics' top-k (objective.topk; full_rkl's loss does not read it): 3 of the 18 tokens
TEACHER_RECIPE = common.REPO / "configs" / "assets_teacher.yaml"
STUDENT_RECIPE = common.REPO / "configs" / "assets_student.yaml"
# the teachers besides the shipped one: recipe, overrides, and the shipped model --smoke starts from (so
# that its 10-step teachers still end their samples, as the cold start needs); trained once, shared by S7, S8
TEACHERS = {
    "swap": (TEACHER_RECIPE, ["data.task_options.swap=true"], "addition-teacher"),
    "peer": (STUDENT_RECIPE, ["train.seed=3"], "addition-student"),
}
TINY = ["student.path=", "student.preset=d8l1"]  # a fresh 1,144-parameter student
METHODS = {  # name: (label, teacher, overrides, with {option} filled in from the command line)
    "control": ("shipped teacher (control)", "shipped", []),
    "swap": ("swapped-format teacher (i)", "swap", []),
    "peer": ("peer teacher: student recipe, seed 3 (ii)", "peer", []),
    "self": ("the student itself as teacher (ii)", "student", []),
    "swap_cold": ("swapped + off-policy cold start", "swap", ["cold_start.samples={cold_samples}"]),
    "swap_select": (
        "swapped + teacher-aligned prompts",
        "swap",
        ["data.select_fraction={select_fraction}", f"data.select_topk={K}"],
    ),
    "tiny": ("tiny student (d8l1, fresh), shipped teacher", "shipped", TINY),
}
COLORS = {
    "control": "tab:blue",
    "swap": "tab:red",
    "peer": "tab:gray",
    "self": "tab:olive",
    "swap_cold": "tab:orange",
    "swap_select": "tab:purple",
    "tiny": "tab:brown",
}


def teacher_dirs(root: Path, names: set[str], smoke: bool = False) -> dict[str, Path]:
    """The teachers ``names`` needs: the shipped ones (the teacher, and the student as a teacher), and the
    others trained once under ``root`` (each its recipe's full run, 1400 or 1100 SFT steps; with ``smoke`` 10
    steps from a shipped model)."""
    dirs = {"shipped": asset_dir("addition-teacher"), "student": asset_dir("addition-student")}
    for name in sorted(names - set(dirs)):
        recipe, overrides, start = TEACHERS[name]
        short = [f"student.path={asset_dir(start)}", "train.steps=10", "train.prompts_per_step=8"]
        cfg = load_config(
            recipe,
            [
                *overrides,
                "train.eval_every=0",
                "train.eval_size=100",
                "train.save_every=0",
                *([*short, "train.eval_size=10"] if smoke else []),
                f"train.threads={common.THREADS}",
                f"train.out_dir={root / name}",
            ],
        )
        dirs[name] = common.train(f"teacher {name}", cfg).out / "final"
    return dirs


def run_config(out: Path, name: str, teacher: Path, overrides: list[str], args: argparse.Namespace) -> Config:
    """One run: the demo's recipe from the shipped student, ``teacher``, the budget, evaluations and the
    diagnostics at top-``K``."""
    return common.config(
        out / name,
        [
            f"teacher.path={teacher}",
            *(override.format_map(vars(args)) for override in overrides),
            *common.budget(args.budget_flops, args.evals),
            f"train.eval_size={args.eval_size}",
            f"train.diagnostics_every={args.diagnostics_every}",
            f"objective.topk={K}",
            f"train.seed={args.seed}",
            *args.override,
        ],
    )


def train_runs(
    out: Path, teachers: Path, names: list[str], args: argparse.Namespace
) -> tuple[dict[str, common.Run], dict[str, Path]]:
    """The runs ``names`` (keys of METHODS), training the teachers they need first."""
    dirs = teacher_dirs(teachers, {METHODS[name][1] for name in names}, args.smoke)
    runs = {
        name: common.train(name, run_config(out, name, dirs[METHODS[name][1]], METHODS[name][2], args))
        for name in names
    }
    return runs, dirs


def alarms(run: common.Run) -> list[tuple[int, str]]:
    """(step, name) of each alarm the run's monitor raised (alarms.jsonl holds "name: message")."""
    rows = common.read_jsonl(run.out / "alarms.jsonl")
    return [(row["step"], row["alarm"].split(":", 1)[0]) for row in rows]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def kl_ends(run: common.Run, window: int = 10) -> tuple[float, float]:
    """Mean teacher_kl over the first and the last ``window`` steps."""
    kl = [m["teacher_kl"] for m in run.metrics if "teacher_kl" in m]
    return mean(kl[:window]), mean(kl[-window:])


def analyse(runs: dict[str, common.Run], teacher_acc: dict[str, float]) -> list[dict]:
    """Per run: its teacher's accuracy, the student's first and last evaluation, teacher_kl at both ends and
    the alarms that fired."""
    return [
        {
            "method": name,
            "teacher_acc": teacher_acc[METHODS[name][1]],
            "acc": (run.evals[0]["greedy_acc"], run.evals[-1]["greedy_acc"]),
            "kl": kl_ends(run),
            "alarms": alarms(run),
            "steps": run.result.get("steps"),
        }
        for name, run in runs.items()
    ]


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| run | teacher accuracy | student before → after | teacher_kl, first → last 10 steps | steps "
        "| alarms (step) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        (a0, a1), (k0, k1) = row["acc"], row["kl"]
        fired = ", ".join(f"{name} ({step})" for step, name in row["alarms"]) or "none"
        lines.append(
            f"| {METHODS[row['method']][0]} | {row['teacher_acc']:.3f} | {a0:.3f} → {a1:.3f} "
            f"| {k0:.3f} → {k1:.3f} | {row['steps']} | {fired} |"
        )
    return lines


def plot(runs: dict[str, common.Run], path: Path) -> None:
    plt = common.pyplot()
    fig, (acc, kl) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, run in runs.items():
        label, color = METHODS[name][0], COLORS[name]
        # the step-0 evaluation comes after any one-time work (a cold start, a prompt selection): placed
        # at what that cost, the FLOPs of step 1 less one step's
        first = run.metrics[:2]
        start = max(0.0, 2 * first[0]["flops"] - first[1]["flops"]) if len(first) == 2 else 0.0
        flops = [e["flops"] if e["step"] else start for e in run.evals]
        acc.plot(flops, [e["greedy_acc"] for e in run.evals], ".-", c=color, label=label)
        steps = [m for m in run.metrics if "teacher_kl" in m]
        kl.plot(
            [m["flops"] for m in steps], smooth([m["teacher_kl"] for m in steps]), "-", c=color, label=label
        )
        flops = {m["step"]: m["flops"] for m in run.metrics}
        for step, alarm in alarms(run):
            kl.axvline(flops.get(step, 0.0), color=color, ls=":", lw=1)
            kl.annotate(
                alarm,
                (flops.get(step, 0.0), 0.98),
                xycoords=("data", "axes fraction"),
                fontsize=6,
                rotation=90,
                va="top",
                color=color,
            )
    acc.set_ylabel("held-out greedy accuracy")
    kl.set_ylabel("teacher_kl, nats/token (10-step mean)")
    kl.set_yscale("log")
    common.finish(fig, (acc, kl), "student + teacher FLOPs", path)


def smooth(values: list[float], window: int = 10) -> list[float]:
    return [mean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def teacher_accuracy(dirs: dict[str, Path], cfg: Config, size: int) -> dict[str, float]:
    return {name: common.accuracy(path, cfg, size)["greedy_acc"] for name, path in dirs.items()}


def options(doc: str | None, name: str) -> argparse.ArgumentParser:
    """The options S7 and S8 share."""
    parser = common.parser(doc, name)
    parser.add_argument("--budget-flops", type=float, default=7.2e11, help="per run: about 400 steps")
    parser.add_argument("--evals", type=int, default=8, help="evaluations per run")
    parser.add_argument("--eval-size", type=int, default=300)
    parser.add_argument("--diagnostics-every", type=int, default=5, help="steps between diagnostics")
    parser.add_argument("--cold-samples", type=int, default=1024, help="swap_cold: cold_start.samples")
    parser.add_argument(
        "--select-fraction", type=float, default=0.25, help="swap_select: data.select_fraction"
    )
    parser.add_argument(
        "--teachers",
        type=Path,
        help="where the teachers are trained (runs/science/teachers; --smoke: OUT/teachers)",
    )
    parser.add_argument(
        "--threads", type=int, default=common.THREADS, help="torch threads (1 on a machine shared by others)"
    )
    return parser


def prepare(args: argparse.Namespace) -> None:
    """The torch threads of every run and the report's header; --smoke: a few steps per run, its 10-step
    teachers under --out."""
    common.THREADS = args.threads
    torch.set_num_threads(args.threads)
    if args.teachers is None:
        args.teachers = args.out / "teachers" if args.smoke else Path("runs/science/teachers")
    if args.smoke:
        args.budget_flops, args.eval_size, args.cold_samples, args.diagnostics_every = 1e9, 8, 16, 2
        args.override = [
            *args.override,
            "train.prompts_per_step=8",
            "train.eval_every=4",
            "cold_start.steps=2",
            "cold_start.prompts_per_step=8",
            "data.pool_size=16",
        ]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = options(__doc__, "s8_conditions")
    args = parser.parse_args(argv)
    prepare(args)
    started = time.perf_counter()
    runs, dirs = train_runs(args.out, args.teachers, list(METHODS), args)
    cfg = run_config(args.out, "control", dirs["shipped"], [], args)
    teacher_acc = teacher_accuracy(dirs, cfg, args.eval_size)
    rows = analyse(runs, teacher_acc)
    plot(runs, args.report.with_suffix(".png"))
    summary = (
        f"Budget {args.budget_flops:.2e} FLOPs per run; {args.eval_size} held-out problems (greedy); seed "
        f"{args.seed}; diagnostics every {args.diagnostics_every} steps at top-{K}. Arrows: the step-0 "
        "evaluation → the end of the budget (the cold-start run's step 0 comes after its cold start). "
        "Alarms: docs/metrics.md; no_progress needs 4 evaluations with a flat mean teacher_kl above 0.1 "
        "and no rise in accuracy."
    )
    common.write(
        args.report,
        "S8: conditions for OPD, recoveries and the no_progress alarm",
        started,
        summary,
        table(rows),
    )
    return rows


if __name__ == "__main__":
    main()
