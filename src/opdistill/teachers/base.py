"""Teachers score the student's tokens. The loop asks for exactly the signal its objective needs.

``LocalTeacher`` (local.py) runs the model in this process; ``RemoteTeacher`` (remote.py) asks
``opd serve-teacher`` (server.py) or a vLLM server over HTTP. ``make_teacher`` picks one from a
``ModelSpec``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, cast

import torch

from opdistill.config import Config, ModelSpec
from opdistill.data.rendering import use_chat_settings
from opdistill.errors import UserError
from opdistill.logits import CHUNK_TOKENS
from opdistill.models import load_model, load_tokenizer, tokenizer_fingerprint
from opdistill.objectives.registry import OBJECTIVES
from opdistill.teachers.cross import CrossTokenizerTeacher, check_config
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
    chunk_tokens: int = CHUNK_TOKENS,
    cross_vocab: str = "prefix",
) -> Teacher:
    """The teacher ``spec`` names: a ``RemoteTeacher`` when ``spec.url`` is set, else a ``LocalTeacher`` over
    ``spec.path`` on ``device``. A teacher whose tokenizer is not the student's (a local one's own, or a
    remote one's ``spec.tokenizer``) scores through a ``CrossTokenizerTeacher`` (cross.py). A remote teacher
    is checked against ``requests`` (e.g. the objective's and the diagnostics' requests) now, so an
    impossible run fails before step 1."""
    if spec.url:
        tokenizer = (
            load_tokenizer(spec.tokenizer, spec.trust_remote_code) if spec.tokenizer else student_tokenizer
        )
        teacher = RemoteTeacher(
            spec.url,
            tokenizer,
            api=spec.api,
            served_model=spec.served_model,
            timeout_s=spec.timeout_s,
            retries=spec.retries,
        )
        for request in requests:
            teacher.require(request)
    elif not spec.path:
        raise UserError(
            "this run needs a trained teacher: set teacher.path to its model directory or teacher.url to a "
            "teacher server."
        )
    else:
        model, tokenizer = load_model(spec)
        teacher = LocalTeacher(cast(torch.nn.Module, model).to(device), chunk_tokens=chunk_tokens)
    if tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(student_tokenizer):
        return teacher
    return CrossTokenizerTeacher(teacher, student_tokenizer, tokenizer, chunk_tokens, cross_vocab)


def run_teachers(
    config: Config,
    tokenizer,
    student,
    initial_student: Callable[[], LocalTeacher],
    saved_self_teacher: dict | None = None,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Teacher], torch.nn.Module | None]:
    """The run's teachers by the tag examples name them with ("" = the default teacher), and OPSD's EMA model
    when the self-teacher is one (the loop moves it toward the student after each step).

    OPSD's self-teacher is the student itself (``live``) or ``initial_student()`` (``frozen``, or the EMA's
    start; a resumed EMA continues from ``saved_self_teacher``). Otherwise ``teacher`` and ``teachers`` are
    loaded (or reached) when the run distils or SFTs on teacher completions, and checked against the requests
    the objective and the diagnostics will make."""
    teachers: dict[str, Teacher] = {}
    ema_model = None
    if config.opsd.teacher == "live":
        teachers[""] = LocalTeacher(student, frozen=False, chunk_tokens=config.train.chunk_tokens)
    elif config.opsd.teacher != "off":
        initial = initial_student()
        if saved_self_teacher is not None:
            initial.model.load_state_dict(saved_self_teacher)
        teachers[""], ema_model = initial, initial.model if config.opsd.teacher == "ema" else None
    elif OBJECTIVES[config.objective.type].distills or config.data.completions != "dataset":
        diagnostics = [config.diagnostics_request] * bool(config.train.diagnostics_every)
        specs = {"": config.teacher, **config.teachers}
        teachers = {
            tag: make_teacher(
                spec,
                tokenizer,
                [config.teacher_request, *diagnostics],
                device,
                config.train.chunk_tokens,
                config.objective.cross_vocab,
            )
            for tag, spec in specs.items()
        }
    for teacher in teachers.values():
        if isinstance(teacher, CrossTokenizerTeacher):  # it renders prompts with its own tokenizer
            check_config(config)
            data = config.data
            use_chat_settings(teacher.teacher_tokenizer, data.chat_template_kwargs, data.max_prompt_tokens)
    widest, vocab = max(config.teacher_request.topk, config.objective.student_topk), len(tokenizer)
    if teachers and widest > vocab:
        raise UserError(
            f"a top-K of {widest} ids is more than the vocabulary ({vocab} ids): lower objective.topk / "
            "objective.baseline_topk."
        )
    return teachers, ema_model
