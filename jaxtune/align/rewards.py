"""Verifiable reward functions for RL fine-tuning (GRPO / PPO): ``fn(completion, reference, record) -> float``.

Built in (``objective.grpo.reward`` names one), or any ``"package.module:function"`` with the same
signature (imported, never pickled):

- ``exact_number``: 1.0 when the completion's answer equals the reference's as numbers (the
  number after ``####`` when present, else the first number in the text), else 0.0;
- ``exact_text``: 1.0 when the stripped completion (cut at its first newline) equals the reference;
- ``uppercase``: the share of the completion's letters that are upper case (the shouting task).
"""

from __future__ import annotations

import importlib
from typing import Callable

from jaxtune.generate.text import extract_answer

RewardFn = Callable[[str, str, dict], float]
NUMBER = r"(-?[\d,]*\.?\d+)"


def _answer(text: str):
    if "####" in text:
        return extract_answer(text, r"####\s*" + NUMBER, True)
    return extract_answer(text, NUMBER, True)


def exact_number(completion: str, reference: str, record: dict) -> float:
    got, want = _answer(completion), _answer(reference)
    return float(got is not None and want is not None and abs(got - want) < 1e-6)


def exact_text(completion: str, reference: str, record: dict) -> float:
    return float(completion.strip().split("\n")[0].strip() == reference.strip())


def uppercase(completion: str, reference: str, record: dict) -> float:
    letters = [c for c in completion if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


BUILTIN: dict[str, RewardFn] = {"exact_number": exact_number, "exact_text": exact_text, "uppercase": uppercase}


def reward_function(name: str) -> RewardFn:
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ValueError(f"reward: unknown reward {name!r} (built in: {', '.join(BUILTIN)}; or 'module:function')")
    module, attr = name.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward: cannot import {name!r} ({err})") from None
    if not callable(fn):
        raise ValueError(f"reward: {name!r} is not callable")
    return fn

