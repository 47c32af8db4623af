"""Multi-digit addition written step by step with carries — the embedded default task.

    prompt      4721+0389=
    completion  1+9+0=10,2+8+1=11,7+3+1=11,4+0+1=05>5110

Each step adds the i-th digits (from the right) and the incoming carry and writes a two-digit sum;
after ``>`` comes the answer, read back from the steps in reverse. Operands are zero-padded, so all
prompts have one length. A problem belongs to the test split iff crc32(prompt) % 10 == 0, so the
splits are disjoint by construction, whatever the sizes and seeds.

The two OPSD regimes (math.md §6.7) as options: ``privileged=rule`` gives every example the same
privileged context ``>>``, a shared rule: write the answer reversed (``...>0115``), which the answer
and completion follow; ``privileged=answer`` gives each example its own answer as context (``>5110,``),
instance-specific. ``shown=true`` puts the context in the prompt (``>>4721+0389=``, what the OPSD
self-teacher sees with the default ``opsd.template``); ``mix_plain`` is the share of training examples
that are the plain task instead (no context, the default answer): SFT on such a mix gives a model that
follows the context when it is there, which OPSD then distils into the context-free student.
``chain=false`` drops the carry chain (``4721+0389=`` → ``>5110``): the answer must come at once, which a
small model mostly cannot do, so a shown answer is information it cannot derive.
``swap=true`` writes each step with the operands swapped (``9+1+0=10,8+2+1=11,...>5110``): the same
work and the same answer in another format, for a teacher whose "thinking pattern" the default student
does not share (benchmarks/science/s8_conditions.py).
``corrections=P`` writes each step of a training completion, with probability P, first with a wrong sum
and then corrects it in place (``1+9+0=11=10,2+8+1=11,...>5110``): the carries and the answer stay right,
so a model trained on it learns to recover from a wrong step (benchmarks/science/s6_correction.py). The
test split and the verifier are unchanged; P = 0 (the default) is the plain task, draw for draw.
"""

from __future__ import annotations

import dataclasses
import random
import zlib

from opdistill.data.examples import Example, privileged_view
from opdistill.data.tasks import RegexVerifier

DESCRIPTION = (
    "N-digit addition with a written carry chain (options: digits=4, test_size=1000; OPSD regimes: "
    "privileged=rule|answer, shown=false, mix_plain=0.0; chain=true: false = the answer alone; "
    "swap=false: true = each step's operands swapped; corrections=0.0: share of training steps written "
    "wrong, then corrected)"
)
TEST_SEED = 12345
RULE = ">>"  # privileged=rule: the shared context (asks for the answer reversed; no new characters)


def problem(a: int, b: int, digits: int, chain: bool = True, swap: bool = False) -> Example:
    prompt = f"{a:0{digits}d}+{b:0{digits}d}="
    steps, carry = [], 0
    for da, db in zip(reversed(f"{a:0{digits}d}"), reversed(f"{b:0{digits}d}"), strict=True):
        total = int(da) + int(db) + carry
        steps.append(f"{db}+{da}+{carry}={total:02d}" if swap else f"{da}+{db}+{carry}={total:02d}")
        carry = total // 10
    answer = str(a + b)
    return Example(prompt=prompt, answer=answer, completion=",".join(steps) * chain + ">" + answer)


def with_context(ex: Example, privileged: str, shown: bool) -> Example:
    """``ex`` in an OPSD regime: its privileged context (the rule, or its own answer), in the prompt if
    shown."""
    if privileged == "rule":
        answer = ex.answer[::-1]
        chain = ex.completion.rpartition(">")[0]
        ex = Example(prompt=ex.prompt, answer=answer, completion=f"{chain}>{answer}", privileged=RULE)
    elif privileged == "answer":
        ex = dataclasses.replace(ex, privileged=f">{ex.answer},")
    if shown and ex.privileged:
        return dataclasses.replace(privileged_view(ex, "{privileged}{prompt}"), privileged="")
    return ex


def wrong_sum(rng: random.Random, total: int) -> int:
    """A sum a step could have written instead of ``total``: uniform over 0..19 (every sum of two digits and
    a carry), never ``total``."""
    wrong = rng.randrange(19)
    return wrong + (wrong >= total)


def with_corrections(ex: Example, rng: random.Random, share: float) -> Example:
    """``ex`` with each step of its carry chain, with probability ``share``, written first with a wrong sum
    and corrected in place: ``1+9+0=10`` becomes ``1+9+0=11=10``. The carries and the answer stay right."""
    chain, sep, answer = ex.completion.rpartition(">")
    if not chain:
        return ex
    steps = []
    for step in chain.split(","):
        if rng.random() < share:
            total = int(step[-2:])
            step = f"{step[:-2]}{wrong_sum(rng, total):02d}={total:02d}"
        steps.append(step)
    return dataclasses.replace(ex, completion=",".join(steps) + sep + answer)


def is_test(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % 10 == 0


def _draw(rng: random.Random, digits: int, test: bool, chain: bool = True, swap: bool = False) -> Example:
    while True:
        a, b = rng.randrange(10**digits), rng.randrange(10**digits)
        ex = problem(a, b, digits, chain, swap)
        if is_test(f"{a:0{digits}d}+{b:0{digits}d}=") == test:
            return ex


class AdditionStream:
    """Endless training problems; ``stream[i]`` depends only on (seed, i) and is never a test problem."""

    def __init__(
        self,
        digits: int,
        seed: int,
        privileged: str = "",
        shown: bool = False,
        mix_plain: float = 0.0,
        chain: bool = True,
        swap: bool = False,
        corrections: float = 0.0,
    ):
        self.digits, self.seed, self.chain, self.swap = digits, seed, chain, swap
        self.privileged, self.shown, self.mix_plain = privileged, shown, mix_plain
        self.corrections = corrections

    def __getitem__(self, index: int) -> Example:
        rng = random.Random(f"addition-{self.digits}-{self.seed}-{index}")
        ex = _draw(rng, self.digits, test=False, chain=self.chain, swap=self.swap)
        if self.privileged and rng.random() >= self.mix_plain:
            ex = with_context(ex, self.privileged, self.shown)
        if self.corrections:  # draws only when on: without it the stream is the plain task's, draw for draw
            ex = with_corrections(ex, rng, self.corrections)
        return ex

    def batch(self, step: int, size: int) -> list[Example]:
        return [self[i] for i in range(step * size, (step + 1) * size)]


def build(
    seed: int,
    digits: int = 4,
    test_size: int = 1000,
    privileged: str = "",
    shown: bool = False,
    mix_plain: float = 0.0,
    chain: bool = True,
    swap: bool = False,
    corrections: float = 0.0,
):
    if not 1 <= digits <= 30:
        raise TypeError(f"digits must be between 1 and 30, got {digits}")
    if privileged not in ("", "rule", "answer") or not 0 <= mix_plain <= 1:
        raise TypeError(
            f"privileged must be rule or answer and mix_plain in [0, 1], got {privileged!r}, {mix_plain}"
        )
    if not 0 <= corrections <= 1 or (corrections and not chain):
        raise TypeError(
            f"corrections must be in [0, 1] and needs chain=true, got {corrections}, chain={chain}"
        )
    rng = random.Random(f"addition-test-{digits}-{TEST_SEED}")
    test, seen = [], set()
    for _ in range(100 * test_size):  # bounded: tiny digit counts have fewer test problems than asked
        if len(test) == test_size:
            break
        ex = _draw(rng, digits, test=True, chain=chain, swap=swap)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            test.append(with_context(ex, privileged, shown) if privileged else ex)
    stream = AdditionStream(digits, seed, privileged, shown, mix_plain, chain, swap, corrections)
    return stream, test, RegexVerifier(r">(\d+)")
