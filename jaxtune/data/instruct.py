"""Instruction records -> text segments that do or do not carry loss.

Formats (``format``; ``auto`` picks per record by the fields it has):

- ``prompt_completion``: ``{"prompt": ..., "completion": ...}`` (other names through
  ``columns``), rendered as ``prompt_format.format(prompt=...)`` + ``completion_format``;
- ``alpaca``: ``{"instruction", "input", "output"}`` with the Stanford Alpaca prompt;
- ``messages``: ``{"messages": [{"role", "content"}, ...]}`` rendered with a chat template:
  the tokenizer's (``apply_chat_template`` of a local Hugging Face tokenizer) or the
  built-in ChatML one when the tokenizer has none.

A rendered example is a list of `Segment`\\ s, each a text (or a special token id) and
whether its tokens are targets. With ``loss="completion"`` only the completion, or, in a
chat, every assistant turn, is trained; ``loss="all"`` trains every token. Segments are
tokenized one by one, so the prompt's tokens are exactly what a generation prompt gives.

Assistant spans under a tokenizer's template: when the template marks them with
``{% generation %}`` blocks (TRL's training templates do), the marked text is what is trained,
exactly as transformers' ``apply_chat_template(..., return_assistant_tokens_mask=True)`` masks
it. Otherwise they are found by rendering prefixes of the chat: turn ``i`` is the text between
``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i + 1])``. A
template whose renderings are not prefixes of each other (one that rewrites earlier turns)
cannot be split that way and is reported for the row. `mask_rule` names the rule a job used.
The segments of an example are tokenized together (`jaxtune.data.segments`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Optional, Sequence, Union

from jaxtune.data.sources import BadRow, checked_text

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"
)
ALPACA_CONTEXT = ", paired with an input that provides further context"
FORMATS = ("prompt_completion", "alpaca", "messages")
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")  # transformers' test for {% generation %}


@dataclass(frozen=True)
class Columns:
    """Field names of the dataset for each part a format reads."""

    prompt: str = "prompt"
    completion: str = "completion"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"
    role: str = "role"  # key of a message's role
    content: str = "content"  # key of a message's text
    system: Optional[str] = None  # a field with a per-row system prompt (chat templates)


@dataclass(frozen=True)
class InstructConfig:
    """How instruction records become training rows (``data.sft``)."""

    format: Literal["auto", "prompt_completion", "alpaca", "messages"] = "auto"
    columns: Columns = field(default_factory=Columns)
    template: Literal["auto", "plain", "tokenizer", "chatml"] = "auto"  # auto: messages use the tokenizer's template, else ChatML; other formats plain
    prompt_format: str = "{prompt}"  # plain prompt_completion: how the prompt is written ({prompt})
    completion_format: str = "{completion}"
    system_prompt: Optional[str] = None  # chat templates: a system turn before every conversation
    loss: Literal["completion", "all"] = "completion"  # completion: only completions / assistant turns are targets
    on_long: Literal["truncate", "drop", "error"] = "truncate"  # examples longer than train.seq_len + 1 tokens (counted)

    def __post_init__(self):
        for name in ("prompt_format", "completion_format"):
            key = name.split("_")[0]
            if "{" + key + "}" not in getattr(self, name):
                raise ValueError(f"data.sft.{name} must contain {{{key}}}, got {getattr(self, name)!r}")


class Segment(NamedTuple):
    text: Union[str, int]  # text, or one special token id
    trained: bool


def chat_of(prompt: str, completion: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def _field(record: dict, name: str, where: str, *, optional: bool = False) -> Optional[str]:
    if name not in record or record[name] is None:
        if optional:
            return None
        fields = ", ".join(map(str, list(record)[:12])) or "none"
        raise BadRow(where, "missing_field", f"no field {name!r} (fields: {fields})")
    if optional and isinstance(record[name], str) and not record[name].strip():
        return None
    return checked_text(record[name], where, name)


def record_format(record: dict, cfg: InstructConfig, where: str) -> str:
    if cfg.format != "auto":
        return cfg.format
    c = cfg.columns
    if c.messages in record:
        return "messages"
    if c.instruction in record and c.output in record:
        return "alpaca"
    if c.prompt in record and c.completion in record:
        return "prompt_completion"
    fields = ", ".join(map(str, list(record)[:12])) or "none"
    raise BadRow(where, "missing_field",
                 f"cannot tell the instruction format: expected {c.messages!r}, {c.instruction!r}+{c.output!r} or "
                 f"{c.prompt!r}+{c.completion!r} (fields: {fields}); set data.sft.format / data.sft.columns")


def messages_of(record: dict, cfg: InstructConfig, where: str) -> list[dict]:
    """The record's conversation as [{"role", "content"}] (system prompt first when configured)."""
    c = cfg.columns
    if c.messages not in record:
        _field(record, c.messages, where)  # raises: no such field, naming the fields there are
    raw = record[c.messages]
    if not isinstance(raw, (list, tuple)) or not raw:
        raise BadRow(where, "missing_field" if raw is None else "not_text",
                     f"field {c.messages!r} must be a non-empty list of messages")
    messages = []
    system = cfg.system_prompt
    if c.system is not None:
        system = _field(record, c.system, where, optional=True) or system
    if system is not None and not (isinstance(raw[0], dict) and raw[0].get(c.role) == "system"):
        messages.append({"role": "system", "content": system})
    messages += [checked_message(m, where, f"message {i}", c.role, c.content) for i, m in enumerate(raw)]
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadRow(where, "empty", "the conversation has no non-empty assistant message to learn")
    return messages


def checked_message(m, where: str, label: str, role: str = "role", content: str = "content") -> dict:
    """One message of a conversation as ``{"role", "content"}`` (``role`` / ``content``: its keys in
    the data); a `BadRow` naming ``label`` (e.g. ``message 2``) when it is not an object with a
    non-empty role string and text content."""
    if not isinstance(m, dict) or role not in m or content not in m:
        raise BadRow(where, "not_a_record", f"{label} must be an object with {role!r} and {content!r}")
    if not isinstance(m[role], str) or not m[role]:
        raise BadRow(where, "not_text", f"{label}: role must be a non-empty string, got {m[role]!r}")
    if not isinstance(m[content], str):
        raise BadRow(where, "not_text", f"{label}: content is a {type(m[content]).__name__}, not text")
    return {"role": m[role], "content": m[content]}


def prompt_and_completion(record: dict, cfg: InstructConfig, where: str, fmt: str) -> tuple[str, str]:
    """Plain (prompt text, completion text) of a prompt_completion or alpaca record."""
    c = cfg.columns
    if fmt == "alpaca":
        instruction = _field(record, c.instruction, where)
        extra = _field(record, c.input, where, optional=True)
        prompt = ALPACA_PROMPT.format(context=ALPACA_CONTEXT if extra else "", instruction=instruction,
                                      input=f"### Input:\n{extra}\n\n" if extra else "")
        return prompt, _field(record, c.output, where)
    prompt = cfg.prompt_format.format(prompt=_field(record, c.prompt, where))
    return prompt, cfg.completion_format.format(completion=_field(record, c.completion, where))


def template_of(cfg: InstructConfig, fmt: str, tokenizer) -> str:
    """The template a record of format ``fmt`` is rendered with: plain | tokenizer | chatml."""
    has_own = has_chat_template(tokenizer)
    if cfg.template == "auto":
        return ("tokenizer" if has_own else "chatml") if fmt == "messages" else "plain"
    if cfg.template == "plain" and fmt == "messages":
        raise ValueError("data.sft.template=plain cannot render conversations (format messages); use auto, "
                         "tokenizer or chatml")
    if cfg.template == "tokenizer" and not has_own:
        raise ValueError("data.sft.template=tokenizer, but the tokenizer has no chat template "
                         "(use template=chatml for the built-in one)")
    return cfg.template


def has_chat_template(tokenizer) -> bool:
    inner = getattr(tokenizer, "tokenizer", None)
    return bool(getattr(inner, "chat_template", None))


def marks_generation(tokenizer) -> bool:
    """Whether the tokenizer's chat template marks assistant text with ``{% generation %}`` blocks that
    can be used (transformers finds them through token offsets: a fast tokenizer)."""
    if not getattr(tokenizer, "has_offsets", False):
        return False
    template = getattr(getattr(tokenizer, "tokenizer", None), "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return isinstance(template, str) and bool(GENERATION_BLOCK.search(template))


def mask_rule(templates: set[str], cfg: InstructConfig, tokenizer) -> str:
    """One line naming how targets were chosen for examples rendered with ``templates``."""
    if cfg.loss == "all":
        return "every token is a target (data.sft.loss=all)"
    parts = []
    if "tokenizer" in templates:
        parts.append("assistant turns marked by the chat template's {% generation %} blocks (as transformers' "
                     "return_assistant_tokens_mask)" if marks_generation(tokenizer) else
                     "assistant turns found by rendering prefixes of each chat (the template has no "
                     "{% generation %} blocks): from the generation prompt to the end of the turn")
    if "chatml" in templates:
        parts.append("assistant turns of the built-in ChatML template (content, <|im_end|> and EOS)")
    if "plain" in templates:
        parts.append("completions (and EOS) after their prompts")
    return "targets: " + "; ".join(parts)


def render(record: dict, where: str, cfg: InstructConfig, tokenizer, *, eos: Optional[int]) -> list[Segment]:
    """The record as segments (``eos``: a token id ending every completion / built-in assistant turn)."""
    fmt = record_format(record, cfg, where)
    if fmt not in FORMATS:
        raise ValueError(f"data.sft.format: unknown format {fmt!r} ({' | '.join(FORMATS)})")
    template = template_of(cfg, fmt, tokenizer)
    train_prompt = cfg.loss == "all"
    if template == "plain":
        prompt, completion = prompt_and_completion(record, cfg, where, fmt)
        if not completion.strip():
            raise BadRow(where, "empty", "empty completion")
        segments = [Segment(prompt, train_prompt), Segment(completion, True)]
        return segments + ([Segment(eos, True)] if eos is not None else [])
    messages = messages_of(record, cfg, where) if fmt == "messages" else chat_of(*prompt_and_completion(record, cfg, where, fmt))
    if fmt != "messages" and cfg.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    if template == "chatml":
        return chatml_segments(messages, train_prompt, eos)
    return tokenizer_template_segments(messages, tokenizer, train_prompt, where)


def chatml_segments(messages: Sequence[dict], train_prompt: bool, eos: Optional[int]) -> list[Segment]:
    """The built-in ChatML rendering: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per turn; an
    assistant turn's content, ``<|im_end|>`` and ``eos`` are its targets."""
    out: list[Segment] = []
    for m in messages:
        if m["role"] == "assistant":
            out.append(Segment("<|im_start|>assistant\n", train_prompt))
            out.append(Segment(m["content"] + "<|im_end|>", True))
            if eos is not None:
                out.append(Segment(eos, True))
            out.append(Segment("\n", train_prompt))
        else:
            out.append(Segment(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", train_prompt))
    return out


def chatml_generation_prompt(messages: Sequence[dict]) -> str:
    return chatml_text(messages, add_generation_prompt=True)


def chatml_text(messages: Sequence[dict], *, add_generation_prompt: bool) -> str:
    """The built-in ChatML rendering as one text (as a tokenizer's ChatML ``apply_chat_template``)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def apply_template(tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool) -> str:
    return tokenizer.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                   add_generation_prompt=add_generation_prompt)


def tokenizer_template_segments(messages: Sequence[dict], tokenizer, train_prompt: bool, where: str) -> list[Segment]:
    if train_prompt:
        return [Segment(apply_template(tokenizer, messages, add_generation_prompt=False), True)]
    if marks_generation(tokenizer):
        return generation_block_segments(messages, tokenizer, where)
    out: list[Segment] = []
    done = ""  # text rendered so far
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = apply_template(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = apply_template(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not before.startswith(done) or not upto.startswith(before):
            raise BadRow(where, "template", "the tokenizer's chat template renders earlier turns differently as the "
                         f"conversation grows (at message {i}), so assistant turns cannot be located; use "
                         "data.sft.template=chatml or data.sft.loss=all")
        out += [Segment(before[len(done):], train_prompt), Segment(upto[len(before):], True)]
        done = upto
    full = apply_template(tokenizer, messages, add_generation_prompt=False)
    if not full.startswith(done):
        raise BadRow(where, "template", "the chat template's full rendering does not extend its prefixes")
    if full[len(done):]:
        out.append(Segment(full[len(done):], train_prompt))
    return [s for s in out if s.text != ""]


def generation_block_segments(messages: Sequence[dict], tokenizer, where: str) -> list[Segment]:
    """The rendered chat split into the text of its tokens that transformers'
    ``return_assistant_tokens_mask`` marks (trained) and the rest."""
    hf = tokenizer.tokenizer
    text = apply_template(tokenizer, messages, add_generation_prompt=False)
    marked = hf.apply_chat_template(list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, spans = tokenizer.encode_with_offsets([text])[0]
    if list(marked["input_ids"]) != ids:
        raise BadRow(where, "template", "the chat template tokenized by transformers differs from its rendered text "
                     "tokenized; use data.sft.template=chatml or data.sft.loss=all")
    chars = [False] * len(text)
    for (start, end), flag in zip(spans, marked["assistant_masks"]):
        if flag:
            chars[start:end] = [True] * (end - start)
    if not any(chars):
        raise BadRow(where, "empty", "the chat template's {% generation %} blocks mark no assistant text")
    out: list[Segment] = []
    start = 0
    for i in range(1, len(text) + 1):
        if i == len(text) or chars[i] != chars[start]:
            out.append(Segment(text[start:i], chars[start]))
            start = i
    return out


def generation_prompt(record: dict, where: str, cfg: InstructConfig, tokenizer, *,
                      shots: Sequence[tuple[dict, str]] = ()) -> tuple[str, str]:
    """-> (prompt text to generate from, reference completion) for a prompt_completion / alpaca
    record, ``shots`` (records with their locations) put before it as solved examples: as
    earlier user/assistant turns under a chat template, as prompt + completion blocks
    separated by a blank line in plain text."""
    fmt = record_format(record, cfg, where)
    if fmt == "messages":
        messages = messages_of(record, cfg, where)
        if messages[-1]["role"] != "assistant":
            raise BadRow(where, "not_a_record", "the last message must be the assistant's reference answer")
        history, reference = messages[:-1], messages[-1]["content"]
        shot_turns = [m for r, w in shots for m in messages_of(r, cfg, w) if m["role"] != "system"]
    else:
        prompt, reference = prompt_and_completion(record, cfg, where, fmt)
        history = chat_of(prompt, "")[:1]
        shot_turns = [m for r, w in shots for m in chat_of(*prompt_and_completion(r, cfg, w, record_format(r, cfg, w)))]
    template = template_of(cfg, fmt, tokenizer)
    if template == "plain":
        blocks = ["".join(prompt_and_completion(r, cfg, w, record_format(r, cfg, w))) for r, w in shots]
        return "\n\n".join(blocks + [history[0]["content"]]), reference
    system = [m for m in history if m["role"] == "system"]
    if not system and cfg.system_prompt is not None:
        system = [{"role": "system", "content": cfg.system_prompt}]
    messages = system + shot_turns + [m for m in history if m["role"] != "system"]
    if template == "chatml":
        return chatml_generation_prompt(messages), reference
    return apply_template(tokenizer, messages, add_generation_prompt=True), reference

