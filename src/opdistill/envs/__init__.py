"""Environments for multi-turn episodes (docs/agents.md): the student takes a turn, the environment answers
with an observation (a tool's result, a game's feedback), until it says the episode is done.

An environment is a small stateful object, one per episode: ``reset(example)`` gives the first user turn,
``step(turn)`` takes the student's turn as text and returns a ``Step`` (the observation, a reward, done).
``demonstration(example)``, where an environment has one, gives the turns of a good episode (what a teacher
is trained on by SFT). Built in: ``calculator`` (addition with a calculator tool) and ``guess`` (find a
secret number from higher/lower feedback); a user's own as ``module:Class``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from opdistill.data.examples import Example
from opdistill.errors import UserError


@dataclass(frozen=True)
class Step:
    observation: str = ""  # the environment's next turn (ignored when done)
    reward: float = 0.0  # added to the episode's reward (its verifier outcome: 1.0 = solved)
    done: bool = False


@runtime_checkable
class Environment(Protocol):
    def reset(self, example: Example) -> str: ...
    def step(self, turn: str) -> Step: ...


EnvFactory = Callable[[], Environment]


def _builtin() -> dict[str, tuple[str, str]]:
    """name -> (module:Class, the task it plays on)."""
    return {
        "calculator": ("opdistill.envs.calculator:Calculator", "addition"),
        "guess": ("opdistill.envs.guess:Guess", "guess"),
    }


def env_names() -> dict[str, str]:
    """Built-in environment name -> the first line of its class's docstring."""
    return {name: (_load(name)().__doc__ or "").split("\n")[0] for name in _builtin()}


def builtin_task(name: str) -> str:
    """The built-in task a built-in environment plays on ("" for a user's environment)."""
    return _builtin()[name][1] if name in _builtin() else ""


def _load(name: str, options: dict | None = None) -> EnvFactory:
    spec = _builtin()[name][0] if name in _builtin() else name
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise UserError(
            f"env.name {name!r} is neither a built-in environment ({', '.join(_builtin())}) nor module:Class."
        )
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UserError(f"cannot import environment {spec!r}: {err}.") from None
    return lambda: cls(**(options or {}))


def make_env(name: str, options: dict | None = None) -> EnvFactory:
    """A factory of fresh environments (one per episode), checked once: bad options and a class that does not
    have ``reset`` and ``step`` are errors before training starts."""
    factory = _load(name, options)
    try:
        probe = factory()
    except TypeError as err:
        raise UserError(f"bad env.options for environment {name!r}: {err}.") from None
    if not isinstance(probe, Environment):
        raise UserError(f"environment {name!r} must have reset(example) -> str and step(turn) -> Step.")
    return factory
