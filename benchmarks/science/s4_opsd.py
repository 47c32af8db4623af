"""S4: OPSD internalises a shared rule, not instance-specific information (docs/science.md, math.md §6.7).

    python benchmarks/science/s4_opsd.py [--base-steps 800] [--steps 200] [--seed 0]
    python benchmarks/science/s4_opsd.py --smoke      # the machinery at a tiny size (tests)

For each regime (rule: every example shares the context ">>", answer reversed; answer: each example's own
answer as context, answers written without the carry chain) it runs configs/opsd_<regime>_base.yaml (SFT
of the shipped student on a 50/50 mix of context-shown and plain prompts) and then configs/opsd_<regime>.yaml
(OPSD with the frozen self-teacher: the base model shown the context), under --out, and evaluates the base
and the OPSD student greedily on the held-out problems with the context hidden (the student's test
condition) and shown (the self-teacher's view). The plot follows the context-free accuracy and the
teacher-KL through OPSD, against the self-teacher's accuracy.
"""

from __future__ import annotations

import time
from pathlib import Path

import common

from opdistill.config import Config, load_config

CONFIGS = common.REPO / "configs"
REGIMES = {
    "rule": "rule: every example shares `>>` = write the answer reversed",
    "answer": "answer: each example's own answer as context, no carry chain",
}
COLORS = {"rule": "tab:blue", "answer": "tab:red"}


def run_config(name: str, out: Path, overrides: list[str]) -> Config:
    """configs/opsd_<name>.yaml with quiet logging, ``overrides`` and its run directory under ``out``."""
    return load_config(
        CONFIGS / f"opsd_{name}.yaml",
        [
            "train.save_every=0",
            "train.diagnostics_every=0",
            f"train.threads={common.THREADS}",
            *overrides,
            f"train.out_dir={out / name}",
        ],
    )


def accuracy(model: Path, regime: str, size: int, shown: bool) -> float:
    """Greedy held-out accuracy with the regime's context hidden (the student's view) or shown (the
    self-teacher's)."""
    cfg = load_config(CONFIGS / f"opsd_{regime}.yaml", [f"data.task_options.shown={str(shown).lower()}"])
    return common.accuracy(model, cfg, size)["greedy_acc"]


def analyse(regime: str, base: common.Run, opsd: common.Run, size: int) -> dict:
    """Accuracy of the base and the OPSD student, context hidden and shown; teacher_kl at the first step and
    over the last ten."""
    models = {"before": base.out / "final", "after": opsd.out / "final"}
    row: dict = {"regime": regime}
    for when, model in models.items():
        for shown in (False, True):
            row[f"{'shown' if shown else 'hidden'}_{when}"] = accuracy(model, regime, size, shown)
    kl = [m["teacher_kl"] for m in opsd.metrics if "teacher_kl" in m]
    row["teacher_kl"] = (kl[0], sum(kl[-10:]) / len(kl[-10:])) if kl else (float("nan"), float("nan"))
    return row


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| regime | without context, before | **without context, after OPSD** "
        "| with context (the self-teacher), before | with context, after "
        "| teacher-KL, first step → last 10 |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        kl0, kl1 = row["teacher_kl"]
        lines.append(
            f"| {REGIMES[row['regime']]} | {row['hidden_before']:.3f} | **{row['hidden_after']:.3f}** "
            f"| {row['shown_before']:.3f} | {row['shown_after']:.3f} | {kl0:.2f} → {kl1:.2f} |"
        )
    return lines


def plot(runs: dict[str, common.Run], rows: list[dict], path: Path) -> None:
    plt = common.pyplot()
    fig, (acc, kl) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        regime, run = row["regime"], runs[row["regime"]]
        color = COLORS[regime]
        acc.plot(
            [e["step"] for e in run.evals],
            [e["greedy_acc"] for e in run.evals],
            ".-",
            color=color,
            label=f"{regime}: student, context hidden",
        )
        acc.axhline(row["shown_before"], color=color, ls=":", label=f"{regime}: self-teacher (context shown)")
        steps = [m for m in run.metrics if "teacher_kl" in m]
        kl.plot([m["step"] for m in steps], [m["teacher_kl"] for m in steps], "-", color=color, label=regime)
    acc.set_ylabel("held-out greedy accuracy")
    kl.set_ylabel("teacher_kl (nats / token)")
    common.finish(fig, (acc, kl), "OPSD step", path)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.parser(__doc__, "s4_opsd")
    parser.add_argument(
        "--base-steps", type=int, default=800, help="SFT steps of the base (context-following)"
    )
    parser.add_argument("--steps", type=int, default=200, help="OPSD steps")
    parser.add_argument("--eval-size", type=int, default=1000, help="held-out problems (1,000: all of them)")
    args = parser.parse_args(argv)
    tiny = ["train.prompts_per_step=8", "train.eval_size=10"] if args.smoke else []
    tiny += args.override
    if args.smoke:
        args.base_steps, args.steps, args.eval_size = 3, 3, 10
    started = time.perf_counter()
    rows, runs = [], {}
    for regime in REGIMES:
        base_cfg = run_config(
            f"{regime}_base", args.out, [f"train.steps={args.base_steps}", "train.eval_every=0", *tiny]
        )
        base = common.train(f"{regime}_base", base_cfg)
        cfg = run_config(
            regime,
            args.out,
            [
                f"student.path={base.out / 'final'}",
                f"train.steps={args.steps}",
                f"train.eval_every={max(1, args.steps // 8)}",
                f"train.seed={args.seed}",
                *tiny,
            ],
        )
        runs[regime] = common.train(regime, cfg)
        rows.append(analyse(regime, base, runs[regime], args.eval_size))
    lines = table(rows)
    plot(runs, rows, args.report.with_suffix(".png"))
    summary = (
        f"Base: {args.base_steps} SFT steps on a 50/50 mix of context-shown and plain prompts; then "
        f"{args.steps} OPSD steps with the frozen self-teacher (the base shown the context, JSD β = 0.5); "
        f"greedy accuracy on {args.eval_size} held-out problems; seed {args.seed}."
    )
    common.write(args.report, "S4: OPSD, shared rule vs instance-specific context", started, summary, lines)
    return rows


if __name__ == "__main__":
    main()
