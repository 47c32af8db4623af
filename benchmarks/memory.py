"""Peak memory of the largest pass without gradient (the teacher's scoring: sampled-token log-probs, top-K and
entropy, what a diagnostics step asks for) against its naive bound, the [B, T, V] fp32 logits of one
whole-batch forward, on a Qwen3-1.7B-shaped model with random weights (docs/scaling.md, "Memory").

    python benchmarks/memory.py                      # B=4, T=2,048, train.chunk_tokens=1,024
    python benchmarks/memory.py --layers 4           # faster: the pass's peak does not grow with depth

The peak is the most resident memory the process holds during the pass (sampled every 5 ms from
/proc/self/statm) above what it held before; it includes the decoder's activations, not just logits. The
same pass with one chunk of B·T positions (what opdistill did before chunking) is measured beside it, and the
analytic figures for the GPU recipe's batch are printed after. Prints ``nograd_peak_vs_naive``: the chunked
pass's measured peak ÷ the naive [B, T, V] fp32 size.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opdistill.data.examples import rollout_of
from opdistill.teachers.local import LocalTeacher
from opdistill.types import SignalRequest

GB = 1e9
# Qwen3-1.7B's shape (its config.json)
QWEN3_1_7B = dict(
    hidden_size=2048,
    intermediate_size=6144,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151_936,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=40_960,
)
RECIPE = {"rows": 32, "positions": 2049}  # configs/qwen3_gpu.yaml: one rank's 8 prompts x 4, 2,048 new tokens


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_during(fn) -> tuple[int, float]:
    """(most resident bytes above the start while ``fn`` runs, its seconds)."""
    start, peak, done = resident_bytes(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    done.set()
    watcher.join()
    return max(peak[0], resident_bytes()) - start, seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=4, help="sequences B (default 4)")
    parser.add_argument("--positions", type=int, default=2048, help="completion tokens T (default 2,048)")
    parser.add_argument("--chunk-tokens", type=int, default=1024, help="train.chunk_tokens (default 1,024)")
    parser.add_argument("--layers", type=int, default=28, help="decoder layers (Qwen3-1.7B: 28)")
    parser.add_argument("--topk", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(num_hidden_layers=args.layers, **QWEN3_1_7B)).eval()
    vocab = model.config.vocab_size
    parameters = sum(p.numel() for p in model.parameters())
    B, T = args.rows, args.positions
    prompts = [[1, 2, 3, 4] for _ in range(B)]
    completions = [torch.randint(0, vocab, (T,)).tolist() for _ in range(B)]
    rollout = rollout_of(prompts, completions, 0)
    request = SignalRequest(topk=args.topk, entropy=True)
    naive = B * T * vocab * 4
    print(
        f"model: Qwen3-1.7B shape, {args.layers} layers, {parameters / 1e9:.2f}B parameters (random, fp32); "
        f"B={B}, T={T}, V={vocab:,}, threads={torch.get_num_threads()}"
    )
    print(f"naive bound: B·T·V fp32 logits = {naive / GB:.2f} GB")
    results = {}
    for label, chunk in (("chunked", args.chunk_tokens), ("one chunk (before)", B * T)):
        teacher = LocalTeacher(model, chunk_tokens=chunk)
        peak, seconds = peak_during(lambda teacher=teacher: teacher.score(rollout, request))
        results[label] = peak
        bound = min(chunk, B * T) * vocab * 4
        print(
            f"{label:>20}: chunk_tokens={chunk:>6}  peak {peak / GB:6.2f} GB  = {peak / naive:.3f} x naive  "
            f"(one chunk's logits {bound / GB:.2f} GB; {seconds:.0f} s)"
        )
    rows, positions = RECIPE["rows"], RECIPE["positions"]
    print(
        f"recipe (analytic): B={rows}, T={positions}: naive {rows * positions * vocab * 4 / GB:.1f} GB; "
        f"chunked at the default train.chunk_tokens=4096: {4096 * vocab * 4 / GB:.2f} GB of logits"
    )
    print(f"nograd_peak_vs_naive: {results['chunked'] / naive:.3f}")


if __name__ == "__main__":
    main()
