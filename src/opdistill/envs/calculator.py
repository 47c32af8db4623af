"""Addition with a calculator tool, on the built-in addition task.

The student writes the carry chain one column at a time and ends its turn after each ``=``: that turn is a
call of the calculator, which answers with the column's two-digit sum. The last turn gives the answer.

    user       4721+0389=
    student    1+9+0=          calculator  10
    student    ,2+8+1=         calculator  11
    student    ,7+3+1=         calculator  11
    student    ,4+0+1=         calculator  05
    student    >5110           (done, reward 1 if it is the sum)

The tool does the arithmetic; the student must copy the right digits and carries and read the answer back
from the sums. A turn with ``>`` is the answer (a model that writes the whole chain in one turn, without
the tool, is graded the same); one that is neither a call nor an answer ends the episode unsolved. The
characters are those of the task, so the shipped tokenizer and models apply.
"""

from __future__ import annotations

import re

from opdistill.data.examples import Example
from opdistill.envs import Step

CALL = re.compile(r"(\d)\+(\d)\+(\d)=$")  # a turn that ends with a column asks for its sum


class Calculator:
    """addition with a calculator tool: each column's sum a call (task addition)"""

    def __init__(self):
        self.answer = ""

    def reset(self, example: Example) -> str:
        self.answer = example.answer
        return example.prompt if isinstance(example.prompt, str) else example.messages()[-1]["content"]

    def step(self, turn: str) -> Step:
        if ">" in turn:  # the answer (a turn may also write the whole chain itself, without the tool)
            return Step(reward=float(turn.rpartition(">")[2].strip() == self.answer), done=True)
        call = CALL.search(turn.strip())
        if call is None:
            return Step(done=True)
        return Step(observation=f"{sum(int(d) for d in call.groups()):02d}")

    @staticmethod
    def demonstration(example: Example) -> list[str]:
        """The task's carry chain as calls, then the answer."""
        chain, _, answer = example.completion.rpartition(">")
        columns = chain.split(",") if chain else []  # task option chain=false: the answer alone
        calls = [f"{',' * (i > 0)}{column.partition('=')[0]}=" for i, column in enumerate(columns)]
        return [*calls, f">{answer}"]
