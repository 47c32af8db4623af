"""Find a secret number in 0..high from higher/lower feedback, on the built-in guess task.

    user       0-99?
    student    50              environment  <     (the secret is lower)
    student    25              environment  >     (higher)
    student    37              (done: =, reward 1)

Bisection finds any secret of 0..99 in 7 guesses, and ``env.max_turns=7`` leaves no slack: an early guess
that does not halve the open interval is a mistake that compounds (the episode may run out of turns), and
the feedback after it is what a good policy recovers from. A turn that is not a number ends the episode.
"""

from __future__ import annotations

from opdistill.data.examples import Example
from opdistill.data.tasks.guess import bisection
from opdistill.envs import Step


class Guess:
    """find a secret number from higher/lower feedback (task guess)"""

    def __init__(self):
        self.secret = -1

    def reset(self, example: Example) -> str:
        self.secret = int(example.answer)
        return example.prompt if isinstance(example.prompt, str) else example.messages()[-1]["content"]

    def step(self, turn: str) -> Step:
        if not turn.strip().isdigit():
            return Step(done=True)
        guess = int(turn.strip())
        if guess == self.secret:
            return Step(reward=1.0, done=True)
        return Step(observation="<" if self.secret < guess else ">")

    @staticmethod
    def demonstration(example: Example) -> list[str]:
        """Bisection: guess the middle of the interval still open."""
        high = int(example.messages()[-1]["content"].partition("-")[2].rstrip("?"))
        return [str(guess) for guess in bisection(int(example.answer), high)]
