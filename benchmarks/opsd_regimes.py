"""OPSD's two regimes on the built-in task (math.md §6.7), before and after, as a Markdown table.

    python benchmarks/opsd_regimes.py [--out build/opsd] [--base-steps 800] [--steps 200] [--seed 0]

For each regime (rule: every example shares the context ">>", answer reversed; answer: each example's own
answer as context, answers written without the carry chain) it runs configs/opsd_<regime>_base.yaml
(SFT of the shipped student on a 50/50 mix of context-shown and plain prompts) and then
configs/opsd_<regime>.yaml (OPSD with the frozen self-teacher),
each under --out, and evaluates the base and the OPSD student greedily on the 1,000 held-out problems
with the context hidden (the student's test condition) and shown (the self-teacher's view). A run whose
final/ exists is reused. docs/data_modes.md and benchmarks/RESULTS.md quote this output.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from opdistill.config import ModelSpec, load_config
from opdistill.data.tasks import load_task
from opdistill.models import load_model
from opdistill.observe.evaluate import evaluate
from opdistill.training import loop

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def accuracy(model_dir: Path, regime: str, shown: bool) -> float:
    """Greedy held-out accuracy on the regime's task (its OPSD config's options), context shown or hidden."""
    model, tokenizer = load_model(ModelSpec(path=str(model_dir)))
    options = load_config(CONFIGS / f"opsd_{regime}.yaml").data.task_options
    task = load_task("addition", {**options, "shown": shown})
    return evaluate(model, tokenizer, task.test, task.verify, max_new_tokens=52)["greedy_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("build/opsd"))
    parser.add_argument("--base-steps", type=int, default=800)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    for regime in ("rule", "answer"):
        base, opsd = args.out / f"{regime}-base", args.out / f"{regime}-opsd"
        if not (base / "final").is_dir():
            config = load_config(
                CONFIGS / f"opsd_{regime}_base.yaml",
                [
                    f"train.steps={args.base_steps}",
                    f"train.out_dir={base}",
                    "train.eval_every=0",
                ],
            )
            loop.run(config)
        if not (opsd / "final").is_dir():
            config = load_config(
                CONFIGS / f"opsd_{regime}.yaml",
                [
                    f"student.path={base / 'final'}",
                    f"train.steps={args.steps}",
                    f"train.seed={args.seed}",
                    f"train.out_dir={opsd}",
                ],
            )
            loop.run(config)
        hidden = [accuracy(d / "final", regime, shown=False) for d in (base, opsd)]
        shown = [accuracy(d / "final", regime, shown=True) for d in (base, opsd)]
        rows.append(f"| {regime} | {hidden[0]:.3f} | **{hidden[1]:.3f}** | {shown[0]:.3f} | {shown[1]:.3f} |")
    print(
        f"base SFT {args.base_steps} steps, OPSD {args.steps} steps (frozen self-teacher, JSD β = 0.5), "
        "greedy accuracy on 1,000 held-out problems"
    )
    print(
        "| regime | without context, before | **without context, after OPSD** "
        "| with context, before | with context, after |"
    )
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
