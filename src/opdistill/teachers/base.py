"""Teachers score the student's tokens. The loop asks for exactly the signal its objective needs.

``LocalTeacher`` (local.py) runs the model in this process; ``RemoteTeacher`` (remote.py) asks
``opd serve-teacher`` (server.py) or a vLLM server over HTTP. ``make_teacher`` picks one from a ``ModelSpec``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, cast

import torch

from opdistill.config import ModelSpec
from opdistill.errors import UserError
from opdistill.models import check_same_tokenizer, load_model
from opdistill.teachers.local import LocalTeacher
from opdistill.teachers.remote import RemoteTeacher
from opdistill.types import Rollout, SignalRequest, TeacherSignal


class Teacher(Protocol):
    def score(
        self, rollout: Rollout, request: SignalRequest, ids_BTK: torch.Tensor | None = None
    ) -> TeacherSignal: ...


def make_teacher(
    spec: ModelSpec,
    student_tokenizer,
    requests: Iterable[SignalRequest] = (),
    device: torch.device | str = "cpu",
) -> Teacher:
    """The teacher ``spec`` names: a ``RemoteTeacher`` when ``spec.url`` is set, else a ``LocalTeacher`` over
    ``spec.path`` on ``device`` whose tokenizer must equal the student's. A remote teacher is checked against
    ``requests`` (e.g. the objective's and the diagnostics' requests) now, so an impossible run fails before
    step 1."""
    if spec.url:
        teacher = RemoteTeacher(
            spec.url,
            student_tokenizer,
            api=spec.api,
            served_model=spec.served_model,
            timeout_s=spec.timeout_s,
            retries=spec.retries,
        )
        for request in requests:
            teacher.require(request)
        return teacher
    if not spec.path:
        raise UserError(
            "this run needs a trained teacher: set teacher.path to its model directory or teacher.url to a "
            "teacher server."
        )
    model, tokenizer = load_model(spec)
    check_same_tokenizer(student_tokenizer, tokenizer)
    return LocalTeacher(cast(torch.nn.Module, model).to(device))
