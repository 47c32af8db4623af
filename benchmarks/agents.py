"""Multi-turn OPD and sequence-level feedback, side by side (docs/agents.md): held-out success, student and
teacher tokens and seconds at equal optimizer steps, on the calculator environment (and the addition task
it plays on, for token-level OPD) and on the guess environment.

    python benchmarks/agents.py [--steps 150] [--eval-size 200] [--envs calculator guess]

Teachers and student warm starts are built first if missing (configs/calculator_teacher.yaml and the
other three *_teacher / *_student configs; a few minutes each). Every method then starts from the
environment's student warm start (brief SFT on demonstrations) with the same prompts per step, except
where a row says otherwise:

  token_opd          single-turn OPD on the environment's task without the environment (calculator only:
                     the shipped student writes the whole chain itself, scored by the shipped teacher)
  untaught_student   multi-turn OPD from the shipped student, which has never called the tool (calculator)
  episode_opd        multi-turn OPD, environment tokens masked (the default)
  episode_unmasked   the same with env.mask_observations=false: the environment's tokens get loss too
  takeover           episode_opd with trd.mode=takeover: the teacher plays on from a failed episode's first
                     rejected turn, kept when it solves the episode
  teacher_pick       4 episodes per prompt, SFT on the best (verifier, then teacher likelihood)
  dpo                4 episodes per prompt, DPO on the best vs the worst (reference = the initial student)

The methods with 4 samples per prompt see 4x the episodes per step at equal prompts. Success is greedy,
an episode solved when its reward is above 0.5 (token_opd: the addition verifier on its single turn).
Tokens are the run's counters (metrics.jsonl): the student's sampled tokens, the teacher's scored plus
generated tokens. Seconds are the run's training time, evaluation excluded.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from opdistill.config import load_config
from opdistill.training import loop

REPO = Path(__file__).resolve().parents[1]
ENVS = {
    "calculator": {
        "teacher": ("configs/calculator_teacher.yaml", "build/calculator/teacher/final"),
        "student": ("configs/calculator_student.yaml", "build/calculator/student/final"),
        "opd": "configs/calculator_opd.yaml",
        # token_opd and untaught_student start from the shipped student, which never calls the tool
        "token_student": "src/opdistill/assets/addition-student",
        "token_teacher": "src/opdistill/assets/addition-teacher",
    },
    "guess": {
        "teacher": ("configs/guess_teacher.yaml", "build/guess/teacher/final"),
        "student": ("configs/guess_student.yaml", "build/guess/student/final"),
        "opd": "configs/guess_opd.yaml",
        "token_student": None,
        "token_teacher": None,
    },
}
GROUP = ["rollout.n_per_prompt=4", "objective.rank_by=verifier+teacher"]
METHODS = {
    "episode_opd": [],
    "episode_unmasked": ["env.mask_observations=false"],
    "takeover": ["trd.mode=takeover"],
    "teacher_pick": ["objective.type=teacher_pick", *GROUP],
    "dpo": ["objective.type=dpo", "optim.lr=3e-4", *GROUP],
}


def build(config: str | None, out: str) -> None:
    if config is None or (REPO / out / "model.safetensors").is_file():
        return
    print(f"building {out} with opd sft --config {config}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "opdistill.cli", "sft", "--config", config], cwd=REPO, check=True)


def run(name: str, config: str, overrides: list[str], out: Path) -> dict:
    config_obj = load_config(REPO / config, [*overrides, f"train.out_dir={out / name}"])
    summary = loop.run(config_obj, show_progress=False)
    evals = [json.loads(line) for line in (out / name / "eval.jsonl").open()]
    last = [json.loads(line) for line in (out / name / "metrics.jsonl").open()][-1]
    return {
        "method": name,
        "problems": evals[0]["n_problems"],
        "before": evals[0]["greedy_acc"],
        "after": summary["final_eval"]["greedy_acc"],
        "turns": last.get("turns", 1.0),
        "student_tokens": last["student_sampled_tokens"],
        "teacher_tokens": last["teacher_scored_tokens"] + last["teacher_generated_tokens"],
        "seconds": last["elapsed_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--envs", nargs="+", default=list(ENVS), choices=list(ENVS))
    parser.add_argument("--methods", nargs="+", default=["token_opd", "untaught_student", *METHODS])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_agents")
    args = parser.parse_args()
    torch.manual_seed(0)
    common = [
        f"train.steps={args.steps}",
        f"train.eval_size={args.eval_size}",
        f"train.eval_every={args.steps}",
    ]
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}", file=sys.stderr
    )
    for env in args.envs:
        spec = ENVS[env]
        for config, out in (spec["teacher"], spec["student"]):
            build(config, out)
        student, teacher = f"student.path={spec['student'][1]}", f"teacher.path={spec['teacher'][1]}"
        rows = []
        for method in args.methods:
            if method in ("token_opd", "untaught_student"):
                if spec["token_student"] is None:
                    continue
                overrides = [*common, f"student.path={spec['token_student']}", teacher]
                if method == "token_opd":
                    overrides += ["env.name=", f"teacher.path={spec['token_teacher']}"]
            else:
                overrides = [*common, student, teacher, *METHODS[method]]
            rows.append(run(method, spec["opd"], overrides, args.out / env))
            print(json.dumps(rows[-1]), file=sys.stderr)
        problems = rows[0]["problems"]
        print(f"\n{env} ({args.steps} steps, greedy success on {problems} held-out problems)\n")
        print("| method | before | after | turns / episode | student tokens | teacher tokens | seconds |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['method']} | {r['before']:.3f} | **{r['after']:.3f}** | {r['turns']:.2f} | "
                f"{r['student_tokens']:,} | {r['teacher_tokens']:,} | {r['seconds']:.0f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
