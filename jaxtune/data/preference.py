"""Preference pairs: records -> (prompt, chosen, rejected) -> tokenized pairs -> padded batches.

Layouts (``format``; ``auto``: ``conversational`` when prompt, chosen or rejected holds a list,
else ``pairs`` when the record has the prompt field, else ``dialogue``):

- ``pairs``: ``{"prompt", "chosen", "rejected"}`` texts (the completions follow the prompt);
- ``dialogue``: the Anthropic HH layout, where chosen and rejected are whole dialogues sharing
  their opening turns: the prompt is the shared text up to and including the last
  ``assistant_tag`` (``"\\n\\nAssistant:"``) they share, the completions the rest of each;
- ``conversational``: TRL's conversational preference rows, lists of ``{"role", "content"}``
  messages: an explicit prompt (``{"prompt": [...], "chosen": [...], "rejected": [...]}``) or an
  implicit one (``chosen`` and ``rejected`` whole conversations; the prompt is their shared leading
  messages, TRL's ``extract_prompt``). Rendered as TRL's ``apply_chat_template`` does, with the
  tokenizer's chat template or, when it has none, the built-in ChatML one: the prompt text is
  ``template(prompt, add_generation_prompt=True)``, each completion ``template(prompt + side)``
  with that prompt text cut from its start. A prompt ending in an assistant message is followed by
  the generation prompt too, as TRL's ``DPOTrainer`` tokenizes it. The template's end of turn ends
  a completion: no EOS is appended unless ``data.add_eos=true`` (TRL adds none to conversations).

Malformed pairs are counted and left out, with a warning naming the counts: ``identical`` (chosen
== rejected), ``empty`` (a completion with no text), ``no_shared_prefix`` (dialogues that do not
share a turn ending in the assistant tag). Rows without the fields follow ``data.on_bad_row``.
Pairs longer than ``seq_len + 1`` tokens have their completions truncated (``on_long``), counted.
Each ``prompt + completion`` is tokenized once and the completion starts where its ids leave the
prompt's (TRL's DPO rule, `jaxtune.data.segments.encode_completions`), so a Metaspace tokenizer
does not prepend ``▁`` to a completion and a BPE merge across the boundary is kept.

A batch holds, for B pairs, ``chosen_*`` and ``rejected_*`` rows in the LM layout (tokens,
targets, loss_mask over the completion, segment_ids, positions; one pair per row, right-padded)
and ``pair_mask`` [B] (0 for the empty rows that fill the last batch of a finite pass), plus
``margin`` [B] when the pairs carry reward margins (TRL's ``margin`` column, ``data.preference.margin``).
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional, Sequence

import numpy as np
from jinja2 import TemplateError

from jaxtune.data.instruct import apply_template, chatml_text, checked_message, has_chat_template
from jaxtune.data.packing import empty_rows, write_piece
from jaxtune.data.segments import encode_completions
from jaxtune.data.sft import ExampleSet, OnePerRowStream, finish_loading, read_records, skip_or_raise
from jaxtune.data.sources import BadRow, DocumentSource, checked_text
from jaxtune.utils.sequences import common_prefix

SIDES = ("chosen", "rejected")


@dataclass(frozen=True)
class PreferenceConfig:
    """``data.preference``: the layout and field names of preference records."""

    format: Literal["auto", "pairs", "dialogue", "conversational"] = "auto"
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    prompt_format: str = "{prompt}"  # pairs: how the prompt is written
    assistant_tag: str = "\n\nAssistant:"  # dialogue: the prompt ends after the last shared one
    on_long: Literal["truncate", "drop", "error"] = "truncate"
    margin: Optional[str] = "margin"  # field of a per-pair reward margin (TRL's column; all rows or none); null: never read
    system_prompt: Optional[str] = None  # conversational: a system turn before every prompt that does not open with one


class Pair(NamedTuple):
    prompt: str
    chosen: str
    rejected: str
    margin: Optional[float] = None  # the row's reward margin, when it has one
    template: Optional[str] = None  # conversational: the chat template it was rendered with (tokenizer | chatml)


class TokenPair(NamedTuple):
    prompt: np.ndarray  # int32
    chosen: np.ndarray  # completion ids (EOS included when added)
    rejected: np.ndarray
    where: str
    margin: Optional[float] = None


def split_dialogues(chosen: str, rejected: str, tag: str) -> Optional[Pair]:
    """HH layout -> (shared prompt through the last shared ``tag``, chosen rest, rejected rest); None
    when the dialogues share no turn ending in ``tag``."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(tag, 0, n)  # the last tag lying wholly inside the shared text
    if cut < 0:
        return None
    end = cut + len(tag)
    return Pair(chosen[:end], chosen[end:], rejected[end:])


def layout_of(record: dict, cfg: PreferenceConfig) -> str:
    """The record's layout: ``cfg.format``, or the one ``auto`` picks (module docstring)."""
    if cfg.format != "auto":
        return cfg.format
    if any(isinstance(record.get(key), list) for key in (cfg.prompt, cfg.chosen, cfg.rejected)):
        return "conversational"
    return "pairs" if cfg.prompt in record else "dialogue"


def pair_of(record: dict, where: str, cfg: PreferenceConfig, tokenizer=None) -> Pair:
    """The record as a `Pair` (BadRow for missing fields; malformed pairs raise ``Malformed``);
    ``tokenizer``: its chat template renders conversational records."""
    fmt = layout_of(record, cfg)
    if fmt == "conversational":
        return chat_pair(record, where, cfg, tokenizer)._replace(margin=margin_of(record, where, cfg.margin))
    texts = {}
    for key in ((cfg.prompt,) if fmt == "pairs" else ()) + (cfg.chosen, cfg.rejected):
        if key not in record:
            fields = ", ".join(map(str, list(record)[:12])) or "none"
            raise BadRow(where, "missing_field", f"no field {key!r} (fields: {fields})")
        value = record[key]
        if isinstance(value, str) and not value.strip():
            raise Malformed(where, "empty", f"field {key!r} is empty")
        texts[key] = checked_text(value, where, key)
    if texts[cfg.chosen] == texts[cfg.rejected]:
        raise Malformed(where, "identical", "chosen and rejected are identical")
    if fmt == "pairs":
        pair = Pair(cfg.prompt_format.format(prompt=texts[cfg.prompt]), texts[cfg.chosen], texts[cfg.rejected])
    else:
        pair = split_dialogues(texts[cfg.chosen], texts[cfg.rejected], cfg.assistant_tag)
        if pair is None:
            raise Malformed(where, "no_shared_prefix", f"chosen and rejected share no turn ending in {cfg.assistant_tag!r}")
    if not pair.chosen.strip() or not pair.rejected.strip():
        raise Malformed(where, "empty", "a completion is empty after the shared prompt")
    return pair._replace(margin=margin_of(record, where, cfg.margin))


def chat_template_of(tokenizer) -> str:
    """The template conversational records are rendered with: the tokenizer's (``tokenizer``) when
    it has one, else the built-in ChatML (``chatml``), as SFT's ``data.sft.template=auto``."""
    return "tokenizer" if has_chat_template(tokenizer) else "chatml"


def render_chat(tokenizer, template: str, messages: Sequence[dict], where: str, *, add_generation_prompt: bool) -> str:
    """``messages`` rendered as text by ``template`` (tokenizer | chatml); a template error names the row."""
    if template == "chatml":
        return chatml_text(messages, add_generation_prompt=add_generation_prompt)
    try:
        return apply_template(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    except TemplateError as err:
        raise BadRow(where, "template", f"the tokenizer's chat template rejects the conversation: {err}") from None


def chat_messages(record: dict, key: str, where: str) -> list[dict]:
    """Field ``key`` of the record as a non-empty list of ``{"role", "content"}`` messages, or a `BadRow`."""
    if record.get(key) is None:
        fields = ", ".join(map(str, list(record)[:12])) or "none"
        raise BadRow(where, "missing_field", f"no field {key!r} (fields: {fields})")
    raw = record[key]
    if not isinstance(raw, list) or not raw:
        got = "an empty list" if isinstance(raw, list) else f"a {type(raw).__name__}"
        raise BadRow(where, "not_text", f"field {key!r} must be a non-empty list of messages ({{role, content}}), "
                     f"got {got} (format conversational)")
    return [checked_message(m, where, f"{key} message {i}") for i, m in enumerate(raw)]


def chat_parts(record: dict, where: str, cfg: PreferenceConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) messages of a conversational record: an explicit prompt list, else the
    leading messages both conversations share (TRL's ``extract_prompt``; a text prompt beside message
    lists is ignored, as TRL's ``maybe_extract_prompt`` does); ``cfg.system_prompt`` put first."""
    chosen, rejected = chat_messages(record, cfg.chosen, where), chat_messages(record, cfg.rejected, where)
    if isinstance(record.get(cfg.prompt), list):
        prompt = chat_messages(record, cfg.prompt, where)
    else:
        n = common_prefix(chosen, rejected)
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise Malformed(where, "no_shared_prefix", "chosen and rejected share no leading message (the prompt)")
    if chosen == rejected:
        raise Malformed(where, "identical", "chosen and rejected are identical")
    for key, side in ((cfg.chosen, chosen), (cfg.rejected, rejected)):
        if not any(m["content"].strip() for m in side):
            raise Malformed(where, "empty", f"the {key!r} completion has no text after the prompt")
    if cfg.system_prompt is not None and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": cfg.system_prompt}] + prompt
    return prompt, chosen, rejected


def chat_pair(record: dict, where: str, cfg: PreferenceConfig, tokenizer) -> Pair:
    """A conversational record rendered as TRL's ``apply_chat_template`` renders it (module docstring).
    Where the prompt alone and the prompt + a completion render differently, the prompt text is their
    common start (TRL's rule, for templates whose generation prompt differs, e.g. DeepSeek-R1's); a
    difference before the generation prompt (earlier turns rewritten) is a `BadRow` naming the row."""
    template = chat_template_of(tokenizer)
    prompt, chosen, rejected = chat_parts(record, where, cfg)
    head = render_chat(tokenizer, template, prompt, where, add_generation_prompt=True)
    sides = [render_chat(tokenizer, template, prompt + side, where, add_generation_prompt=False)
             for side in (chosen, rejected)]
    shared = min(common_prefix(head, text) for text in sides)
    if shared < len(head):
        turns = render_chat(tokenizer, template, prompt, where, add_generation_prompt=False)
        if not head.startswith(turns) or shared < len(turns):
            side = min(range(2), key=lambda i: common_prefix(head, sides[i]))
            raise BadRow(where, "template", f"the rendering of prompt + {(cfg.chosen, cfg.rejected)[side]} does not "
                         f"start with the prompt's rendering (they part at character {shared}: "
                         f"{head[shared:shared + 30]!r} vs {sides[side][shared:shared + 30]!r}): the chat template "
                         "renders the prompt's turns differently once a completion follows")
    return Pair(head[:shared], sides[0][shared:], sides[1][shared:], template=template)


def margin_of(record: dict, where: str, name: Optional[str]) -> Optional[float]:
    """The row's reward margin (a finite number in field ``name``), None when it has no such field."""
    if name is None or record.get(name) is None:
        return None
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise BadRow(where, "not_a_number", f"field {name!r} (the pair's reward margin) must be a finite number, "
                     f"got {value!r}")
    return float(value)


def check_margins(pairs: Sequence[tuple[Pair, str]], name: Optional[str]) -> None:
    """Margins come with every pair or with none (one row without a margin would train with 0)."""
    missing = [where for pair, where in pairs if pair.margin is None]
    if missing and len(missing) < len(pairs):
        raise ValueError(f"{missing[0]}: no field {name!r} (the reward margin) while other rows have one; give every "
                         f"pair a margin ({len(missing)} of {len(pairs)} lack one) or set data.preference.margin=null")


class Malformed(BadRow):
    """A pair that parses but cannot teach a preference: always counted and left out."""


def load_pairs(sources: Sequence[DocumentSource], cfg: PreferenceConfig, tokenizer, *, split: str = "all",
               eval_fraction: float = 0.05, seq_len: int, add_bos: bool = False, add_eos: Optional[bool] = None,
               on_bad_row: str = "error", vocab_size: Optional[int] = None, name: str = "data.sources") -> ExampleSet:
    counts: Counter = Counter()
    records = read_records(sources, split, eval_fraction, on_bad_row=on_bad_row, counts=counts)
    result = ExampleSet([], counts, len(records) + sum(counts.values()))
    pairs = []
    for record, where in records:
        try:
            pairs.append((pair_of(record, where, cfg, tokenizer), where))
        except Malformed as bad:
            counts[bad.kind] += 1
        except BadRow as bad:
            skip_or_raise(bad, on_bad_row, counts)
    eos = getattr(tokenizer, "eos_token_id", None) if add_eos is not False else None
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    check_margins(pairs, cfg.margin)
    announce_templates({p.template for p, _ in pairs} - {None}, name, split)
    encoded = encode_completions(tokenizer, [(p.prompt, (p.chosen, p.rejected)) for p, _ in pairs])
    for (pair, where), (prompt_ids, completions) in zip(pairs, encoded):
        prompt = np.asarray(bos + prompt_ids, np.int32)
        end = [eos] if eos is not None and (pair.template is None or add_eos) else []  # chats: only when asked
        sides = [np.asarray(ids + end, np.int32) for ids in completions]
        if not all(len(ids) for ids in completions):
            counts["empty"] += 1  # a completion whose text merged into the prompt's last token
            continue
        if vocab_size is not None and max(int(a.max()) for a in (prompt, *sides) if len(a)) >= vocab_size:
            raise ValueError(f"{where}: a token id >= the model's vocab_size {vocab_size}")
        room = seq_len + 1 - len(prompt)
        if any(len(prompt) + len(s) > seq_len + 1 for s in sides):
            if cfg.on_long == "error":
                raise ValueError(f"{where}: prompt + completion exceed train.seq_len + 1 = {seq_len + 1} tokens "
                                 "(data.preference.on_long: truncate or drop, counted)")
            if cfg.on_long == "drop" or room < 1:
                counts["dropped_long"] += 1
                continue
            counts["truncated"] += 1
            sides = [s[:room] for s in sides]
        result.examples.append(TokenPair(prompt, sides[0], sides[1], where, pair.margin))
    return finish_loading(result, name, split, "preference pairs")


def announce_templates(templates: set[str], name: str, split: str) -> None:
    """Say on stderr (stdout may carry --json results) which chat template rendered conversational pairs."""
    described = {"tokenizer": "the tokenizer's chat template", "chatml": "the built-in ChatML template (the tokenizer "
                 "has no chat template)"}
    if templates:
        print(f"{name} ({split} split): conversational pairs rendered with "
              f"{' and '.join(described[t] for t in sorted(templates))}; completions end with the template's end of "
              "turn (EOS appended only with data.add_eos=true)", file=sys.stderr, flush=True)


class PairStream(OnePerRowStream):
    """Batches of pairs (module docstring); order, epochs and state: `jaxtune.data.sft.OnePerRowStream`."""

    state_kind = "pairs"

    def __init__(self, pairs: ExampleSet, batch_size: int, seq_len: int, *, name: str = "preference", **kw):
        super().__init__(pairs, batch_size, seq_len, name=name, **kw)

    @property
    def reference(self) -> Optional[np.ndarray]:
        """Precomputed reference log-probs [n, 2] of the pairs (set on their `ExampleSet`), or None."""
        return self.source.reference

    def __next__(self) -> dict[str, np.ndarray]:
        indices = self.next_indices()
        sides = {s: empty_rows(self.batch_size, self.seq_len, self.pad_id) for s in SIDES}
        pair_mask = np.zeros((self.batch_size,), np.float32)
        reference = self.reference
        ref = np.zeros((self.batch_size, 2), np.float32)
        margins = self.examples[0].margin is not None  # all pairs or none (check_margins)
        margin = np.zeros((self.batch_size,), np.float32)
        for row, index in enumerate(indices):
            pair = self.examples[index]
            if reference is not None:
                ref[row] = reference[index]
            if margins:
                margin[row] = pair.margin
            for side, completion in zip(SIDES, (pair.chosen, pair.rejected)):
                tokens = np.concatenate([pair.prompt, completion])
                trained = np.arange(len(tokens)) >= len(pair.prompt)
                write_piece(sides[side], row, 0, tokens, 1, trained)
            pair_mask[row] = 1.0
        batch = {f"{side}_{k}": v for side in SIDES for k, v in sides[side].items()}
        batch["pair_mask"] = pair_mask
        if margins:
            batch["margin"] = margin
        if reference is not None:
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[:, 0], ref[:, 1]
        return batch
