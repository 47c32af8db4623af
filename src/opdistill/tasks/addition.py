"""Multi-digit addition written step by step with carries — the embedded default task.

    prompt      4721+0389=
    completion  1+9+0=10,2+8+1=11,7+3+1=11,4+0+1=05>5110

Each step adds the i-th digits (from the right) and the incoming carry and writes a two-digit sum;
after ``>`` comes the answer, read back from the steps in reverse. Operands are zero-padded, so all
prompts have one length. A problem belongs to the test split iff crc32(prompt) % 10 == 0, so the
splits are disjoint by construction, whatever the sizes and seeds.
"""

from __future__ import annotations

import random
import zlib

from opdistill.data import Example
from opdistill.tasks import RegexVerifier

DESCRIPTION = "N-digit addition with a written carry chain (options: digits=4, test_size=1000)"
TEST_SEED = 12345


def problem(a: int, b: int, digits: int) -> Example:
    prompt = f"{a:0{digits}d}+{b:0{digits}d}="
    steps, carry = [], 0
    for da, db in zip(reversed(f"{a:0{digits}d}"), reversed(f"{b:0{digits}d}"), strict=True):
        total = int(da) + int(db) + carry
        steps.append(f"{da}+{db}+{carry}={total:02d}")
        carry = total // 10
    answer = str(a + b)
    return Example(prompt=prompt, answer=answer, completion=",".join(steps) + ">" + answer)


def is_test(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % 10 == 0


def _draw(rng: random.Random, digits: int, test: bool) -> Example:
    while True:
        a, b = rng.randrange(10**digits), rng.randrange(10**digits)
        ex = problem(a, b, digits)
        if is_test(f"{a:0{digits}d}+{b:0{digits}d}=") == test:
            return ex


class AdditionStream:
    """Endless training problems; ``stream[i]`` depends only on (seed, i) and is never a test problem."""

    def __init__(self, digits: int, seed: int):
        self.digits, self.seed = digits, seed

    def __getitem__(self, index: int) -> Example:
        return _draw(random.Random(f"addition-{self.digits}-{self.seed}-{index}"), self.digits, test=False)

    def batch(self, step: int, size: int) -> list[Example]:
        return [self[i] for i in range(step * size, (step + 1) * size)]


def build(seed: int, digits: int = 4, test_size: int = 1000):
    if not 1 <= digits <= 30:
        raise TypeError(f"digits must be between 1 and 30, got {digits}")
    rng = random.Random(f"addition-test-{digits}-{TEST_SEED}")
    test, seen = [], set()
    for _ in range(100 * test_size):  # bounded: tiny digit counts have fewer test problems than asked
        if len(test) == test_size:
            break
        ex = _draw(rng, digits, test=True)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            test.append(ex)
    return AdditionStream(digits, seed), test, RegexVerifier(r">(\d+)")
