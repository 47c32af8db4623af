"""Find a secret number from higher/lower feedback — the task of the ``guess`` environment (envs/guess.py).

    prompt  0-99?        answer  37 (the secret; the prompt does not show it)
    completion  49<24>36>42<39<37   (bisection written out: each guess, then the feedback it got)

Every prompt is the same: what tells episodes apart is the feedback, so the task is a policy (bisect the
interval still open), not a mapping to learn by heart. Training secrets are drawn in (seed, index); the test
set is every secret of the range once.
"""

from __future__ import annotations

import random

from opdistill.data.examples import Example
from opdistill.data.tasks import RegexVerifier

DESCRIPTION = "find a secret number from higher/lower feedback, with env.name=guess (options: high=99)"


class GuessStream:
    def __init__(self, high: int, seed: int):
        self.high, self.seed = high, seed

    def __getitem__(self, index: int) -> Example:
        secret = random.Random(f"guess-{self.high}-{self.seed}-{index}").randint(0, self.high)
        return problem(secret, self.high)

    def batch(self, step: int, size: int) -> list[Example]:
        return [self[i] for i in range(step * size, (step + 1) * size)]


def bisection(secret: int, high: int) -> list[int]:
    """The guesses that bisect 0..high down to ``secret``: the middle of the interval still open each time."""
    low, guesses = 0, []
    while True:
        guesses.append((low + high) // 2)
        if guesses[-1] == secret:
            return guesses
        low, high = (low, guesses[-1] - 1) if secret < guesses[-1] else (guesses[-1] + 1, high)


def problem(secret: int, high: int) -> Example:
    guesses = bisection(secret, high)
    feedback = ["<" if secret < g else ">" for g in guesses[:-1]]
    completion = "".join(f"{g}{f}" for g, f in zip(guesses, [*feedback, ""], strict=True))
    return Example(prompt=f"0-{high}?", answer=str(secret), completion=completion)


def build(seed: int, high: int = 99):
    if not 1 <= high <= 9999:
        raise TypeError(f"high must be between 1 and 9999, got {high}")
    test = [problem(secret, high) for secret in range(high + 1)]
    return GuessStream(high, seed), test, RegexVerifier(r"\d+")
