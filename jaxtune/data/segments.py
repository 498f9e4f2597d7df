"""Rendered examples -> token ids and targets, each example's text tokenized once.

An example is a list of `Segment`\\ s: a text or one special token id, and whether its tokens
are targets. Tokenizing the segments one by one gives token sequences the model never sees
at inference: a Metaspace tokenizer (Llama-2, Mistral) prepends ``▁`` at every call, so an
assistant turn "It" after "assistant\\n" would become ``▁It``, and BPE merges cannot cross a
call boundary. So `encode_segments` joins an example's text and tokenizes it once, as
``apply_chat_template`` + the tokenizer and TRL's ``tokenizer(prompt + completion)`` do, and
a token is a target when the characters it covers overlap a target segment (transformers'
rule for ``return_assistant_tokens_mask``; a zero-width token, such as a lone prepended
``▁``, goes with the character that follows it). Special token ids inside an example (EOS
after a completion or turn) are written as their text (``</s>``, ``<|im_end|>``) when that
text tokenizes back to exactly that id; ids that open the example (BOS) stay ids, as a
tokenizer's post-processor adds them, so the first text still counts as the start of the
input. An id that does not round-trip splits the text around it.

Tokenizers without character offsets tokenize segment by segment: the byte and character
tokenizers (one token per byte / character, so nothing differs) and Python-only transformers
tokenizers (`jaxtune.data.tokenizer.HFTokenizer.has_offsets` is False; warned once).

Prompt + completion pairs that share a prompt (preference pairs, multiple-choice scoring,
reward judges) follow TRL's DPO and SFT trainers: each ``prompt + completion`` is tokenized
once and the completion starts where its ids leave the prompt's own (`encode_completions`).
"""

from __future__ import annotations

import logging
from typing import Sequence, Union

import numpy as np

from jaxtune.data.instruct import Segment
from jaxtune.utils.sequences import common_prefix

log = logging.getLogger(__name__)
_warned: set[str] = set()  # tokenizer classes already warned about

Run = Union[int, list[Segment]]  # a special token id kept as an id, or text segments tokenized together


def tokenizes_once(tokenizer) -> bool:
    """Whether `encode_segments` tokenizes each example's text in one call (needs offsets)."""
    has = getattr(tokenizer, "has_offsets", None)
    kind = type(getattr(tokenizer, "tokenizer", tokenizer)).__name__
    if has is False and kind not in _warned:
        _warned.add(kind)
        log.warning("the tokenizer (%s) gives no character offsets, so examples are tokenized segment by segment: "
                    "a token never spans a prompt/completion boundary, which may differ from tokenizing the whole "
                    "text; a fast (tokenizer.json) tokenizer avoids this", kind)
    return bool(has)


def runs_of(segments: Sequence[Segment], tokenizer) -> list[Run]:
    """The example as runs: leading ids (BOS) alone, then text with round-tripping special ids written
    as their text; an id without such text ends the run before it."""
    runs: list[Run] = []
    text: list[Segment] = []
    for s in segments:
        if isinstance(s.text, str):
            text.append(s)
            continue
        spelled = tokenizer.special_text(s.text) if runs or text else None
        if spelled is not None:
            text.append(Segment(spelled, s.trained))
            continue
        if text:
            runs.append(text)
            text = []
        runs.append(s)
    if text:
        runs.append(text)
    return runs


def trained_tokens(segments: Sequence[Segment], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Per token (its character span in the joined text), whether it overlaps a trained segment."""
    chars = np.concatenate([np.full(len(s.text), s.trained, bool) for s in segments] or [np.zeros(0, bool)])
    out = []
    for start, end in spans:
        if end > start:
            out.append(bool(chars[start:end].any()))
        else:  # zero-width (a prepended marker): the character it stands before
            out.append(bool(chars[start]) if start < len(chars) else bool(len(chars) and chars[-1]))
    return out


def encode_segments(rendered: Sequence[Sequence[Segment]], tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """Segments of many examples -> (tokens int32, trained bool) per example (module docstring); all
    texts tokenized in one batch."""
    if not tokenizes_once(tokenizer):
        texts = [s.text for segments in rendered for s in segments if isinstance(s.text, str)]
        encoded = iter(tokenizer.encode_batch(texts) if texts else [])
        return _rows([[_id_piece(s) if isinstance(s.text, int) else _flat_piece(list(next(encoded)), s.trained)
                       for s in segments] for segments in rendered])
    runs = [runs_of(segments, tokenizer) for segments in rendered]
    texts = ["".join(s.text for s in run) for example in runs for run in example if not isinstance(run, Segment)]
    encoded = iter(tokenizer.encode_with_offsets(texts) if texts else [])

    def piece(run: Run) -> tuple[list[int], list[bool]]:
        if isinstance(run, Segment):
            return _id_piece(run)
        ids, spans = next(encoded)
        return list(ids), trained_tokens(run, spans)

    return _rows([[piece(run) for run in example] for example in runs])


def _id_piece(segment: Segment) -> tuple[list[int], list[bool]]:
    return [int(segment.text)], [segment.trained]


def _flat_piece(ids: list[int], trained: bool) -> tuple[list[int], list[bool]]:
    return ids, [trained] * len(ids)


def _rows(examples: Sequence[Sequence[tuple[list[int], list[bool]]]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each example's pieces (ids, trained flags) joined into (tokens int32, trained bool)."""
    return [(np.asarray([t for ids, _ in pieces for t in ids], np.int32),
             np.asarray([f for _, flags in pieces for f in flags], bool)) for pieces in examples]


def encode_completions(tokenizer, items: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt, completions) items -> (prompt ids, ids of each completion) by TRL's rule: each
    ``prompt + completion`` tokenized once, the shared prompt being the ids every one of them has in
    common with the prompt tokenized alone (module docstring). One batched tokenizer call."""
    texts = []
    for prompt, completions in items:
        texts.append(prompt)
        texts += [prompt + c for c in completions]
    encoded = iter(tokenizer.encode_batch(texts) if texts else [])
    out = []
    for _, completions in items:
        alone = list(next(encoded))
        joint = [list(next(encoded)) for _ in completions]
        n = min((common_prefix(alone, j) for j in joint), default=len(alone))
        out.append(((joint[0] if joint else alone)[:n], [j[n:] for j in joint]))
    return out
