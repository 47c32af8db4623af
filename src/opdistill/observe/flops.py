"""The FLOPs a run spent, from its token counters (``RunState``, metrics.jsonl): the usual 6N rule.

N is a model's total parameter count (the embedding included: it is tied to the LM head, so its N also pays
for the head's matmul). Per token:

    student  6N x student_train_tokens    forward + backward over every trained token, prompt included
             2N x student_sampled_tokens  KV-cached decoding, one forward per sampled token
             2N x prompt prefill          the sampler's prompt pass: on-policy the trained rows are the
                                          sampled rows, so it is student_train_tokens - student_sampled_tokens
    teacher  2N x teacher_scored_tokens   scoring forwards over prompt + completion
             2N x teacher_generated_tokens  generation (SFT targets, pools, cold start, TRD's refinements)
                                            and SKD's token-by-token verification, prefill included

Attention-score FLOPs (about 4 x layers x context x hidden a token) are left out, as in the 6N rule, and so
are extra no-grad student forwards (diagnostics, TIP, pruning) and evaluation: what is counted is what a
method needs to train, the same way for every method, so budgets and "compute to a target" compare.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class FlopCounter:
    student_params: int
    teacher_params: int | None  # the largest of the run's teachers (0: none; None: a server's, unknown)

    def student(self, counters: Mapping[str, float]) -> float:
        trained, sampled = counters["student_train_tokens"], counters["student_sampled_tokens"]
        prefill = trained - sampled if sampled else 0
        return 6 * self.student_params * trained + 2 * self.student_params * (sampled + prefill)

    def total(self, counters: Mapping[str, float]) -> float:
        return self(counters).get("flops", 0.0)

    def __call__(self, counters: Mapping[str, float]) -> dict[str, float]:
        """student_flops, teacher_flops and their sum ``flops`` (only student_flops when the teacher's size
        is unknown)."""
        student = self.student(counters)
        if self.teacher_params is None:
            return {"student_flops": student}
        tokens = counters["teacher_scored_tokens"] + counters["teacher_generated_tokens"]
        teacher = 2 * self.teacher_params * tokens
        return {"student_flops": student, "teacher_flops": teacher, "flops": student + teacher}


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def teacher_parameters(teachers: Iterable) -> int | None:
    """The parameter count of the largest teacher (0 with none); None when one is a server, whose size this
    process cannot see."""
    sizes = []
    for teacher in teachers:
        model = getattr(getattr(teacher, "inner", teacher), "model", None)  # a cross-tokenizer one wraps it
        if model is None:
            return None
        sizes.append(parameters(model))
    return max(sizes, default=0)
