"""Small synthetic instruction tasks with exact answers, for demonstrations and tests that must
show learning on a CPU in minutes (the answers are checkable, so exact match means something).

``addition(n, seed)``: ``a + b`` (a < 100, b < 10) answered with the sum, as prompt/completion
records (``{"prompt": "47+8=", "completion": "55"}``) or, with ``chat=True``, as
``{"messages": [user, assistant]}`` conversations. Deterministic in (n, seed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def addition(n: int, seed: int, *, chat: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 100, n), rng.integers(0, 10, n)
    if chat:
        return [{"messages": [{"role": "user", "content": f"What is {x}+{y}?"},
                              {"role": "assistant", "content": str(int(x + y))}]} for x, y in zip(a, b)]
    return [{"prompt": f"{x}+{y}=", "completion": str(int(x + y))} for x, y in zip(a, b)]


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


COLOURS = ("red", "green", "blue")
FILLER = tuple("the a of and to in is it on at by we".split())


def colour_sentences(n: int, seed: int) -> list[dict]:
    """Sentences of filler words with one colour word somewhere; the label is that colour
    (``{"text", "label"}``, 3 classes): separable by one token anywhere in the text."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        k = int(rng.integers(len(COLOURS)))
        words = list(rng.choice(FILLER, int(rng.integers(3, 8))))
        words.insert(int(rng.integers(len(words) + 1)), COLOURS[k])
        rows.append({"text": " ".join(words), "label": COLOURS[k]})
    return rows


def shout_preferences(n: int, seed: int) -> list[dict]:
    """Preference pairs with a known preference: asked to say a made-up word, the chosen answer
    shouts it (upper case), the rejected one does not (``{"prompt", "chosen", "rejected"}``)."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    rows = []
    for _ in range(n):
        word = "".join(rng.choice(letters, int(rng.integers(3, 7))))
        rows.append({"prompt": f"Say {word}:", "chosen": f" {word.upper()}!", "rejected": f" {word}."})
    return rows


def shout_demonstrations(n: int, seed: int, shout_rate: float = 0.25) -> list[dict]:
    """Demonstrations for an SFT policy that sometimes shouts: the prompts of
    ``shout_preferences(n, seed)``, answered with the chosen (shouted) completion with probability
    ``shout_rate``, else the rejected one (``{"prompt", "completion"}``). The policy RL starts
    from: its mean reward is about ``shout_rate``, with room to rise."""
    pick = np.random.default_rng([seed, 1]).random(n) < shout_rate
    return [{"prompt": r["prompt"], "completion": r["chosen"] if s else r["rejected"]}
            for r, s in zip(shout_preferences(n, seed), pick)]
