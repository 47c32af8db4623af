"""Every objective and weighting on the built-in task, same warm start, same steps: held-out accuracy after.

    python benchmarks/objectives.py [--steps 150] [--seed 0] [--only NAME ...] [--out runs/objectives]

Each row is `opd distill --config configs/distill_addition.yaml` (the shipped 34k-parameter student at
~0.70 from the shipped 133k teacher) with the row's overrides, `train.steps` steps, and greedy accuracy
on 1,000 held-out problems at the end. One seed per row: differences of a point or two are noise (the
three-seed spread of the demo is about ±1 point). Prints a Markdown table for benchmarks/RESULTS.md.
Run directories go under --out, which must not hold an earlier run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from opdistill.config import load_config
from opdistill.training import loop

G4 = ["rollout.n_per_prompt=4", "train.prompts_per_step=16"]  # verifier objectives: 4 samples per prompt
ROWS: dict[str, list[str]] = {
    "full_rkl": [],
    "full_fkl": ["objective.type=full_fkl"],
    "jsd β=0.5": ["objective.type=jsd"],
    "sampled_rkl": ["objective.type=sampled_rkl", "optim.lr=3e-4"],
    "sampled_rkl + vOPD": ["objective.type=sampled_rkl", "objective.baseline=vopd", "optim.lr=3e-4"],
    "sampled_rkl + vOPD top-4": [
        "objective.type=sampled_rkl",
        "objective.baseline=vopd",
        "objective.baseline_topk=4",
        "optim.lr=3e-4",
    ],
    "k2": ["objective.type=k2", "optim.lr=3e-4"],
    "topk sg K=4 (student)": ["objective.type=topk_rkl", "objective.topk=4"],
    "topk raw K=4 (student)": ["objective.type=topk_rkl", "objective.topk=4", "objective.topk_variant=raw"],
    "topk renorm K=4 (teacher)": [
        "objective.type=topk_rkl",
        "objective.topk=4",
        "objective.topk_variant=renorm",
        "objective.topk_support=teacher",
    ],
    "topk tail K=4 (teacher)": [
        "objective.type=topk_rkl",
        "objective.topk=4",
        "objective.topk_variant=tail",
        "objective.topk_support=teacher",
    ],
    "topk pg K=4 (union)": [
        "objective.type=topk_rkl",
        "objective.topk=4",
        "objective.topk_variant=pg",
        "objective.topk_support=union",
    ],
    "topk renorm K=4 (intersect)": [
        "objective.type=topk_rkl",
        "objective.topk=4",
        "objective.topk_variant=renorm",
        "objective.topk_support=intersect",
    ],
    "minillm γ=0.5": ["objective.type=minillm", "objective.discount=0.5", "optim.lr=3e-4"],
    "sead": ["objective.type=sead"],
    "scope": ["objective.type=scope", "optim.lr=3e-4", *G4],
    "dasd": ["objective.type=dasd", "optim.lr=3e-4", *G4],
    "sampled_rkl + GRPO": ["objective.type=sampled_rkl", "objective.grpo_coef=1", "optim.lr=3e-4", *G4],
    "sampled_rkl + GRPO, OPD on failed only": [
        "objective.type=sampled_rkl",
        "objective.grpo_coef=1",
        "objective.route_opd=failed_only",
        "optim.lr=3e-4",
        *G4,
    ],
    "full_rkl + position decay α=3": ["weighting.position_decay=3"],
    "full_rkl + first 16 tokens only": ["weighting.loss_window=16"],
    "full_rkl + IW-OPD γ=0.5": ["weighting.iw_opd_gamma=0.5"],
    "full_rkl + TIP ρ=0.5": ["weighting.tip_ratio=0.5"],
    "full_rkl + Prune": ["weighting.prune=true", "objective.topk=4"],
    "sampled_rkl + EOPD": [
        "objective.type=sampled_rkl",
        "optim.lr=3e-4",
        "weighting.eopd_coef=1",
        "weighting.eopd_threshold=0.3",
        "objective.topk=4",
    ],
    "full_rkl + StableOPD (gold SFT + ref KL)": ["objective.sft_coef=0.5", "objective.ref_kl_coef=1e-3"],
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, help="run only these row names")
    parser.add_argument("--out", default="runs/objectives")
    args = parser.parse_args()
    print("| objective | held-out greedy accuracy | teacher_kl, first → last step | train s |")
    print("|---|---|---|---|")
    for index, (name, overrides) in enumerate(ROWS.items()):
        if args.only and name not in args.only:
            continue
        out = Path(args.out) / f"{index:02d}-seed{args.seed}"
        config = load_config(
            "configs/distill_addition.yaml",
            [
                *overrides,
                f"train.steps={args.steps}",
                f"train.seed={args.seed}",
                "train.eval_every=0",
                "train.eval_size=1000",
                "train.save_every=0",
                f"train.out_dir={out}",
                "train.threads=2",
            ],
        )
        result = loop.run(config, show_progress=False)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        accuracy = result["final_eval"]["greedy_acc"]
        kl = f"{rows[0]['teacher_kl']:.3f} → {rows[-1]['teacher_kl']:.3f}"
        print(f"| {name} | {accuracy:.3f} | {kl} | {result['elapsed_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
