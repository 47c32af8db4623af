"""`opd generate`: sample completions from any model on a prompt set into JSONL, keeping only valid ones.

The output has the fields of the input data (prompt, answer, id, privileged) plus ``completion``, so it
serves as ``data.train_file`` for SFT on teacher samples, sequence-level KD or an off-policy cold start
(math.md §11.2). Validity, not correctness, decides what is kept: a completion must end (EOS before
``max_new_tokens``), contain the ``require`` pattern when one is given, repeat no line 5 times or more and no
100-character span 3 times or more. An invalid sample is drawn again, at most ``max_retries`` times (only
when sampling: a greedy retry would repeat itself), then dropped; the counts say why.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Sequence

import torch

from opdistill.data.examples import Example
from opdistill.data.rendering import encode_prompts
from opdistill.observe.evaluate import completion_texts
from opdistill.observe.progress import NullProgress, ProgressBar
from opdistill.sampling.rollout import sample_prompts

REPEATED_LINE = 5  # a non-blank line this many times makes a completion invalid (math.md §11.2)
SPAN, REPEATED_SPAN = 100, 3  # a 100-character span this many times makes it invalid (math.md §11.2)


def invalid_reason(text: str, truncated: bool, require: re.Pattern | None = None) -> str | None:
    """Why ``text`` is not a valid completion (math.md §11.2), or None when it is."""
    if truncated:
        return "truncated"
    if require is not None and not require.search(text):
        return "missing required pattern"
    lines = Counter(line.strip() for line in text.splitlines() if line.strip())
    if lines and max(lines.values()) >= REPEATED_LINE:
        return "repeated line"
    spans = Counter(text[i : i + SPAN] for i in range(len(text) - SPAN + 1))
    if spans and max(spans.values()) >= REPEATED_SPAN:
        return "repeated span"
    return None


def generate(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    n: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    require: re.Pattern | None = None,
    max_retries: int = 3,
    seed: int = 0,
    batch_size: int = 256,
    show_progress: bool = False,
) -> tuple[list[Example], Counter]:
    """``n`` valid completions per example where they can be had, and the count of dropped samples by reason
    (``kept`` counts the others). Deterministic in ``seed``."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    attempts = 1 + (max_retries if temperature > 0 else 0)
    wanted = [ex for ex in examples for _ in range(n)]
    kept: dict[int, tuple[str, list[int]]] = {}
    dropped: Counter = Counter()
    pending = list(range(len(wanted)))
    bar = ProgressBar("generate", len(wanted), 0) if show_progress else NullProgress()
    with bar:
        for attempt in range(attempts):
            failed = []
            for start in range(0, len(pending), batch_size):
                rows = pending[start : start + batch_size]
                rollout = sample_prompts(
                    model,
                    tokenizer,
                    encode_prompts(tokenizer, [wanted[i] for i in rows]),
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    generator=generator,
                )
                texts, ids = completion_texts(tokenizer, rollout), rollout.completion_ids()
                truncated_B = rollout.truncated_B.tolist()
                for row, text, sample, truncated in zip(rows, texts, ids, truncated_B, strict=True):
                    reason = invalid_reason(text, truncated, require)
                    if reason is None:
                        kept[row] = text, sample
                    elif attempt == attempts - 1:
                        dropped[reason] += 1
                    else:
                        failed.append(row)
                bar.update(len(kept) + sum(dropped.values()), 0.0, {"kept": len(kept), "retry": attempt})
            pending = failed
    dropped["kept"] = len(kept)
    completed = [
        dataclasses.replace(wanted[i], completion=kept[i][0], completion_ids=tuple(kept[i][1]))
        for i in sorted(kept)
    ]
    return completed, dropped
