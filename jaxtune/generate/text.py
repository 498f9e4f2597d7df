"""Text around generation: prompts to token ids, the tokens that stop a completion, completions
cut at stop strings, and the answer a completion gives (for exact match and verifiable rewards)."""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence


def encode_prompt(tokenizer, text: str, add_bos: bool) -> list[int]:
    """The prompt's ids, after the tokenizer's BOS when ``add_bos`` (and it has one)."""
    ids = list(tokenizer.encode(text))
    return ([tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []) + ids


def stop_tokens_of(tokenizer, cfg) -> tuple[int, ...]:
    """The model's EOS id(s) and the tokenizer's, sorted: where a sampled completion ends."""
    eos = cfg.eos_token_id
    stops = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        stops.add(int(tokenizer.eos_token_id))
    return tuple(sorted(int(s) for s in stops))


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first of the ``stops`` strings it contains."""
    ends = [text.find(s) for s in stops if s and text.find(s) >= 0]
    return text[: min(ends)] if ends else text


def extract_answer(text: str, pattern: Optional[str], numeric: bool) -> Optional[Any]:
    """The answer in ``text``: ``pattern``'s first group (None if it does not match), else the stripped
    text; as a float when ``numeric`` (commas and a leading $ removed; None if it is not a number)."""
    if pattern is not None:
        found = re.search(pattern, text)
        if found is None:
            return None
        text = found.group(1)
    text = text.strip()
    if not numeric:
        return text
    try:
        return float(text.replace(",", "").lstrip("$"))
    except ValueError:
        return None
