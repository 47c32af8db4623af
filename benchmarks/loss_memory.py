"""Peak extra memory of the chunked losses against the issue's bound, on CPU, and print a Markdown table.

    python benchmarks/loss_memory.py [--T 4096] [--V 151936] [--K 16] [--reference-T 512]

Requirement: full-vocab and top-K losses are computed in chunks over T, and at V = 151,936, T = 4,096 a
loss's peak extra memory stays <= 1/8 of materialising fp32 [T, V] student and teacher log-probs
(baseline 2 * T * V * 4 bytes = 4.98 GB, bound 622 MB; MB = 10^6 bytes throughout).

Extra memory = peak resident memory during the loss's forward + backward, minus the resident memory just
before the loss with its inputs already allocated and touched (student logits [1, T, V] fp32 requiring
grad, per-token weights [1, T], and teacher logits [1, T, V] fp32 or teacher top-K ids and log-probs
[1, T, K]), minus the gradient w.r.t. the student logits, which any loss's backward must produce: that is
subtracted analytically as T * V * 4 bytes. Peak = ru_maxrss after the backward; "just before" = VmRSS
(current, not peak) from /proc/self/status, so an earlier high-water mark can only overstate the extra,
never hide it. Each case runs in a fresh subprocess after a tiny warm-up call of the same loss (lazy
initialisation is not counted). Inputs are filled with randn so their pages are resident.

Each case runs twice. "glibc default" is the process as a user runs it, and is what the check uses.
"mmap >= 4 MiB" reruns the case with MALLOC_MMAP_THRESHOLD_=4194304 (every block of 4 MiB or more is
mmapped and unmapped on free), which measures what the loss's live tensors need. The two differ when chunk
temporaries are at most 32 MiB (glibc's cap on its dynamic mmap threshold): those come from the heap,
whose freed space glibc may keep; losses.CHUNK_ELEMENTS is chosen above the cap (benchmarks/RESULTS.md).

Cases (B = 1): generalized_jsd at beta = 0.5 and 1 (teacher logits), topk_divergence "sg" on the teacher's
top-K (computed chunk by chunk so the teacher's [T, V] logits never exist in the measured process), and
token_logprobs (the sampled objectives' only vocab pass), all chunked with the default CHUNK_ELEMENTS;
plus the unchunked beta = 0.5 JSD at --reference-T positions as a reference for what materialising costs
(not run at the full T: it would take tens of GB). Exits 1 if a chunked case exceeds the bound under
the default allocator.

The bound is meant for the issue's sizes: a chunk's temporaries are a fixed ~40 MiB (CHUNK_ELEMENTS), so at
quick sizes (--T 256 --V 32000: one chunk, i.e. no chunking at all) they exceed 1/8 of the small baseline
and the script exits 1; such a run only checks that the script works.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

import torch

from opdistill.objectives.losses import (
    CHUNK_ELEMENTS,
    generalized_jsd,
    token_logprobs,
    topk_divergence,
    topk_logprobs,
)

MB = 1e6
FIXED_MMAP = {
    "MALLOC_MMAP_THRESHOLD_": str(4 << 20)
}  # glibc tunable; fixing it also disables the dynamic rise
CHUNKED_CASES = ["jsd-0.5", "jsd-1.0", "topk-sg", "token-logprobs"]
REFERENCE_CASE = "jsd-0.5-unchunked"
LABELS = {
    "jsd-0.5": "`generalized_jsd` β=0.5, chunked",
    "jsd-1.0": "`generalized_jsd` β=1 (reverse KL), chunked",
    "topk-sg": "`topk_divergence` sg, K={K} teacher ids, chunked",
    "token-logprobs": "`token_logprobs`, chunked",
    REFERENCE_CASE: "reference: `generalized_jsd` β=0.5, **unchunked**",
}


def resident_bytes() -> int:
    """Current resident set (VmRSS), not the high-water mark."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (this benchmark needs Linux)")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def make_loss(case: str, T: int, V: int, K: int, chunk_elements: int):
    """Inputs of one case, touched, and a closure running its forward + weighted backward."""
    weights_BT = torch.rand(1, T)
    if case == "topk-sg":
        # the teacher's top-K, built a few positions at a time: its [T, V] logits never exist here
        ids_P, logp_P = [], []
        for start in range(0, T, 256):
            ids_BTK, logp_BTK = topk_logprobs(torch.randn(1, min(256, T - start), V), K)
            ids_P.append(ids_BTK)
            logp_P.append(logp_BTK)
        ids_BTK, teacher_logp_BTK = torch.cat(ids_P, 1), torch.cat(logp_P, 1)
        del ids_P, logp_P
        student_BTV = torch.randn(1, T, V).requires_grad_(True)
        return student_BTV, lambda: topk_divergence(
            student_BTV, ids_BTK, teacher_logp_BTK, "sg", chunk_elements=chunk_elements
        ).backward(weights_BT)
    student_BTV = torch.randn(1, T, V).requires_grad_(True)
    if case == "token-logprobs":
        tokens_BT = torch.randint(0, V, (1, T))
        return student_BTV, lambda: token_logprobs(
            student_BTV, tokens_BT, chunk_elements=chunk_elements
        ).backward(weights_BT)
    teacher_BTV = torch.randn(1, T, V)
    beta = 1.0 if case == "jsd-1.0" else 0.5
    return student_BTV, lambda: generalized_jsd(
        student_BTV, teacher_BTV, beta, chunk_elements=chunk_elements
    ).backward(weights_BT)


def run_case(case: str, T: int, V: int, K: int) -> dict:
    torch.manual_seed(0)
    unchunked = case == REFERENCE_CASE
    # warm-up at 8 x 64 through the same path (unchunked, or chunks of 2 positions) so lazy init is not
    # counted
    make_loss(case, 8, 64, K, 8 * 64 + 1 if unchunked else 2 * 64)[1]()
    gc.collect()
    student_BTV, loss = make_loss(case, T, V, K, T * V + 1 if unchunked else CHUNK_ELEMENTS)
    gc.collect()
    resident_before, peak_before = resident_bytes(), peak_bytes()
    start = time.perf_counter()
    loss()
    wall_s = time.perf_counter() - start
    peak_after = peak_bytes()
    assert student_BTV.grad is not None and student_BTV.grad.shape == student_BTV.shape
    gradient = T * V * 4
    return {
        "case": case,
        "T": T,
        "V": V,
        "resident_before": resident_before,
        "peak_before": peak_before,
        "peak_after": peak_after,
        "extra": peak_after - resident_before - gradient,
        "wall_s": wall_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--T", type=int, default=4096, help="positions (B = 1)")
    parser.add_argument("--V", type=int, default=151_936, help="vocabulary")
    parser.add_argument("--K", type=int, default=16, help="top-K ids for the topk case")
    parser.add_argument("--reference-T", type=int, default=512, help="positions of the unchunked reference")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case in this process
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.case:
        print(json.dumps(run_case(args.case, args.T, args.V, args.K)))
        return

    rows, over = [], []
    for case in [*CHUNKED_CASES, REFERENCE_CASE]:
        T = min(args.reference_T, args.T) if case == REFERENCE_CASE else args.T
        command = [
            sys.executable,
            __file__,
            "--case",
            case,
            "--T",
            str(T),
            "--V",
            str(args.V),
            "--K",
            str(args.K),
        ]
        default, fixed = (
            json.loads(subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout)
            for env in (None, {**os.environ, **FIXED_MMAP})
        )
        baseline = 2 * T * args.V * 4
        bound = baseline / 8
        for name, result in (("default", default), ("mmap", fixed)):
            masked = result["peak_before"] - result["resident_before"]
            # an earlier high-water mark above the pre-loss state: the extra is overstated
            if masked > 16 * MB:
                print(
                    f"note: {case} ({name}): peak before the loss was {masked / MB:.0f} MB above the "
                    "resident set",
                    file=sys.stderr,
                )
        within = ["yes" if result["extra"] <= bound else "no" for result in (default, fixed)]
        if case != REFERENCE_CASE and default["extra"] > bound:
            within[0] = "**NO**"
            over.append(f"{case}: {default['extra'] / MB:.0f} MB > {bound / MB:.0f} MB")
        chunks = 1 if case == REFERENCE_CASE else -(-T // max(1, CHUNK_ELEMENTS // args.V))
        rows.append(
            f"| {LABELS[case].format(K=args.K)} | {T} | {chunks} | {bound / MB:.0f} | "
            f"{default['extra'] / MB:.0f} | {default['extra'] / baseline:.3f} | "
            f"{fixed['extra'] / MB:.0f} | {fixed['extra'] / baseline:.3f} | "
            f"{default['extra'] / MB / T:.3f} / {fixed['extra'] / MB / T:.3f} | {' / '.join(within)} | "
            f"{default['wall_s']:.1f} / {fixed['wall_s']:.1f} |"
        )
    print(
        f"V = {args.V}, B = 1, CHUNK_ELEMENTS = {CHUNK_ELEMENTS} "
        f"({max(1, CHUNK_ELEMENTS // args.V)} positions "
        f"per chunk), torch {torch.__version__}, {torch.get_num_threads()} threads; MB = 10^6 bytes; "
        "ratio = extra / fp32 [T,V]×2; pairs are glibc default / mmap ≥ 4 MiB"
    )
    print(
        "| case | T | chunks | bound MB | extra MB, glibc default | ratio | extra MB, mmap ≥ 4 MiB | ratio | "
        "MB / position | within bound | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if over:
        print("over the bound: " + "; ".join(over), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
