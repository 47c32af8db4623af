"""Held-out evaluation: greedy accuracy, avg@n and unbiased pass@k (math.md §13.2)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from opdistill.data.examples import Example, rollout_of
from opdistill.data.rendering import encode_completion, encode_prompts, end_ids
from opdistill.data.tasks import Verifier
from opdistill.logits import CHUNK_TOKENS, CompletionLogits, reduce_chunks
from opdistill.observe.diagnostics import distinct_answers, distinct_n, pass_at_k, token_entropy
from opdistill.sampling.episodes import EpisodeSpec
from opdistill.sampling.episodes import outcomes as episode_outcomes
from opdistill.sampling.rollout import sample_prompts
from opdistill.training.distributed import ONE_PROCESS, World
from opdistill.types import Rollout

BATCH_TOKENS = 65536  # prompt + completion tokens sampled per batch (train.eval_batch_tokens)


def decode_completions(tokenizer, tokens_BT: torch.Tensor, mask_BT: torch.Tensor) -> list[str]:
    return [
        tokenizer.decode(row[m].tolist(), skip_special_tokens=True)
        for row, m in zip(tokens_BT, mask_BT, strict=True)
    ]


def completion_texts(tokenizer, rollout: Rollout) -> list[str]:
    """Each row's completion as a verifier reads it: its loss tokens without the end token."""
    ends_E = torch.tensor(end_ids(tokenizer), device=rollout.tokens_BT.device)
    keep_BT = rollout.loss_mask_BT & ~torch.isin(rollout.tokens_BT, ends_E)
    return decode_completions(tokenizer, rollout.tokens_BT, keep_BT)


def sample_completions(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    n: int = 1,
    seed: int = 0,
    batch_tokens: int = BATCH_TOKENS,
    all_finished: Callable[[bool], bool] = bool,
    longest_prompt: int = 0,
) -> tuple[list[str], list[list[int]]]:
    """``n`` completions per example (grouped per example), in batches of at most ``batch_tokens`` prompt +
    completion tokens (what bounds the sampler's KV cache): their texts (as a verifier reads them) and their
    token ids as sampled (through the end token where they ended). Batches are sized for the longest of
    these prompts, or ``longest_prompt`` tokens if longer (ranks sampling shares of one set pass the set's,
    so each runs the same number of batches)."""
    generator = torch.Generator().manual_seed(seed)
    repeated = [p for p in encode_prompts(tokenizer, examples) for _ in range(n)]
    longest = max(max(map(len, repeated), default=0), longest_prompt) + max_new_tokens
    rows = max(1, batch_tokens // longest)
    texts: list[str] = []
    ids: list[list[int]] = []
    for start in range(0, len(repeated), rows):
        rollout = sample_prompts(
            model,
            tokenizer,
            repeated[start : start + rows],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            generator=generator,
            all_finished=all_finished,
        )
        texts.extend(completion_texts(tokenizer, rollout))
        ids.extend(rollout.completion_ids())
    return texts, ids


def evaluate(
    model,
    tokenizer,
    examples: Sequence[Example],
    verify: Verifier,
    *,
    max_new_tokens: int,
    n: int = 0,
    ks: Sequence[int] = (),
    temperature: float = 1.0,
    seed: int = 0,
    shown: list | None = None,
    batch_tokens: int = BATCH_TOKENS,
    chunk_tokens: int = CHUNK_TOKENS,
    world: World | None = None,
    episodes: EpisodeSpec | None = None,
) -> dict[str, float]:
    """Greedy accuracy; with n > 0 also avg@n, pass@k over n samples at ``temperature`` (k in ``ks``, by
    default 1, 2, 4, ... n) and their diversity: distinct final answers per problem, distinct n-grams and
    the model's mean token entropy on them. ``shown`` (a list) receives every problem's (example, greedy
    completion, verdict). With ``episodes`` each sample is a multi-turn episode, correct when its
    environment's reward is above 0.5 (its transcript stands for the completion; no token entropy).

    Memory: sampling runs ``batch_tokens`` tokens at a time, the entropy pass ``chunk_tokens`` positions of
    logits at a time. Under torchrun (``world``) each rank samples its share of the problems and the results
    are gathered, so every rank returns the same figures (sampled ones depend on the world size: each rank
    draws from its own stream)."""
    world = world or ONE_PROCESS
    share, real = world.shard(examples)
    settings = {
        "max_new_tokens": max_new_tokens,
        "batch_tokens": batch_tokens,
        "all_finished": world.all_finished,
        "longest_prompt": max(map(len, encode_prompts(tokenizer, examples)), default=0),
    }

    def sampled(**kwargs) -> tuple[list[str], list[bool]]:  # every problem's, gathered from the ranks
        count = kwargs.get("n", 1)
        if episodes is not None:
            texts, solved = episode_outcomes(
                model,
                tokenizer,
                share,
                episodes,
                max_new_tokens=max_new_tokens,
                batch_tokens=batch_tokens,
                **kwargs,
            )
            return world.gather(texts[: real * count]), world.gather(solved[: real * count])
        texts, _ = sample_completions(model, tokenizer, share, **settings, **kwargs)
        texts = world.gather(texts[: real * count])
        return texts, [bool(verify(c, examples[i // count])) for i, c in enumerate(texts)]

    greedy, verdicts = sampled()
    if shown is not None:
        shown.extend(zip(examples, greedy, verdicts, strict=True))
    result: dict[str, float] = {
        "n_problems": len(examples),
        "greedy_acc": sum(verdicts) / len(examples),
    }
    if n > 0:
        samples, solved = sampled(temperature=temperature, n=n, seed=seed + world.rank)
        correct = [sum(solved[i * n : (i + 1) * n]) for i in range(len(examples))]
        result[f"avg@{n}"] = sum(c / n for c in correct) / len(examples)
        for k in ks or pass_k_ladder(n):
            result[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(examples)
        # diversity (math.md §13.4): distinct final answers per problem, distinct character n-grams
        extract = getattr(verify, "extract", str.strip)
        answers = [[extract(samples[i * n + j]) or "" for j in range(n)] for i in range(len(examples))]
        result["distinct_answers"] = distinct_answers(answers)
        for size in (2, 3, 4):
            result[f"distinct_{size}"] = distinct_n(samples, size)
        if episodes is None:
            result["token_entropy"] = mean_token_entropy(
                model, tokenizer, examples, samples, n, batch_tokens, chunk_tokens
            )
    return result


@torch.no_grad()
def mean_token_entropy(
    model,
    tokenizer,
    examples: Sequence[Example],
    completions: list[str],
    n: int,
    batch_tokens: int = BATCH_TOKENS,
    chunk_tokens: int = CHUNK_TOKENS,
) -> float:
    """The model's mean entropy (nats) over the tokens of its own completions (``n`` per example, grouped),
    scored ``batch_tokens`` tokens per forward and ``chunk_tokens`` positions of logits at a time."""
    prompts = [p for p in encode_prompts(tokenizer, examples) for _ in range(n)]
    targets = [
        encode_completion(tokenizer, text, examples[i // n].messages()) for i, text in enumerate(completions)
    ]
    longest = max((len(p) + len(c) for p, c in zip(prompts, targets, strict=True)), default=1)
    rows = max(1, batch_tokens // longest)
    total, count = 0.0, 0
    for start in range(0, len(prompts), rows):
        part = slice(start, start + rows)
        rollout = rollout_of(prompts[part], targets[part], tokenizer.pad_token_id)
        rollout = rollout.to(next(model.parameters()).device)
        logits = CompletionLogits(model, rollout)
        entropy_BT = reduce_chunks(
            logits.chunks(chunk_tokens),
            logits.shape,
            lambda rows, positions, logits_btV: {"entropy": token_entropy(logits_btV)},
        )["entropy"]
        total += float(entropy_BT[rollout.loss_mask_BT].sum())
        count += int(rollout.loss_mask_BT.sum())
    return total / max(count, 1)


def pass_k_ladder(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to n (and n itself): the pass@k curve of math.md §13.2."""
    ladder = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ladder if ladder[-1] == n else [*ladder, n]
