"""The scale path on one GPU, in a few minutes: a Qwen3-0.6B-shaped student (random weights, fp32 master,
bf16 autocast) distilled from a same-shaped random teacher by ``opd distill``'s own loop, with the built-in
sampler and, when vLLM is installed, the colocated vLLM engine. Prints, per engine, the seconds of each
phase of a step (median over the steps after the first), tokens/s and the GPU's peak memory, and checks
that the loss and teacher_kl are finite.

    python benchmarks/gpu_check.py                   # on a GPU machine (about 5 minutes on one H200)
    python benchmarks/gpu_check.py --smoke           # on a CPU: a tiny model, the same code path

Nothing is downloaded: the models are random and the tokenizer is a character tokenizer padded with unused
ids to Qwen3's vocabulary width (151,936), so the logits have their real size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opdistill.config import load_config
from opdistill.data.tasks import corpus_text, task_from_config
from opdistill.models import char_tokenizer
from opdistill.observe.timing import PHASES
from opdistill.sampling.vllm_engine import vllm_available
from opdistill.training import loop

QWEN3_0_6B = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=40_960,
)
SMOKE = dict(
    QWEN3_0_6B,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
)


def save_random_model(shape: dict, tokenizer, seed: int, dtype: torch.dtype, path: Path) -> Path:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    Qwen3ForCausalLM(config).to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny model with a small vocabulary (CPU check)"
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step (x 4 samples)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.error("no GPU here: run with --smoke for the CPU check of the same code path")
    base = load_config(None, ["data.task=addition"])
    task = task_from_config(base.data, 0)
    tokenizer = char_tokenizer(corpus_text(task), size=1024 if args.smoke else 151_936)
    shape = SMOKE if args.smoke else QWEN3_0_6B
    engines = ["builtin"] + ["vllm"] * vllm_available()
    device = torch.cuda.get_device_name() if cuda else "CPU"
    print(
        f"device: {device}; vLLM: {'yes' if vllm_available() else 'not installed'}; vocab {len(tokenizer):,}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        student = save_random_model(shape, tokenizer, 0, torch.float32, root / "student")
        teacher = save_random_model(shape, tokenizer, 1, torch.bfloat16, root / "teacher")
        print(f"models written in {time.perf_counter() - started:.0f} s")
        for engine in engines:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            out = root / f"run_{engine}"
            config = load_config(
                None,
                [
                    f"student.path={student}",
                    f"teacher.path={teacher}",
                    "teacher.dtype=bfloat16",
                    "data.task=addition",
                    "objective.type=topk_rkl",
                    "objective.topk=16",
                    "objective.topk_support=teacher",
                    "objective.topk_variant=tail",
                    f"rollout.engine={engine}",
                    "rollout.n_per_prompt=4",
                    f"rollout.max_new_tokens={args.max_new_tokens}",
                    "optim.lr=1e-6",
                    f"train.steps={args.steps}",
                    f"train.prompts_per_step={args.prompts}",
                    "train.micro_batch_size=16",
                    "train.precision=bf16",
                    "train.eval_every=0",
                    "train.eval_size=16",
                    "train.diagnostics_every=3",
                    f"train.out_dir={out}",
                ],
            )
            started = time.perf_counter()
            loop.run(config, show_progress=False)
            wall = time.perf_counter() - started
            records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
            steady = records[1:] or records
            peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
            phases = {p: statistics.median(r.get(f"time_{p}_s", 0.0) for r in steady) for p in PHASES}
            finite = all(torch.isfinite(torch.tensor([r["loss"], r["teacher_kl"]])).all() for r in records)
            step_s = statistics.median(r["step_s"] for r in steady)
            sampled = statistics.median(r["student_sampled_tokens"] for r in steady)
            print(
                f"[{engine}] {len(records)} steps in {wall:.0f} s (engine start and evaluation included); "
                f"median step {step_s:.2f} s: "
                + ", ".join(f"{p} {s:.2f}" for p, s in phases.items() if s)
                + f"; sampled tokens/s {sampled / max(phases['sampling'], 1e-9):.0f}, "
                f"trained tokens/s {statistics.median(r['tokens_per_s'] for r in steady):.0f}; "
                f"peak GPU memory {peak:.1f} GB; loss and teacher_kl finite: {finite}"
            )


if __name__ == "__main__":
    main()
