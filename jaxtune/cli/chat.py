"""`jaxtune chat RUN [key=value ...]`: talk to a model, one user message per line of stdin.

RUN is a Hugging Face model directory (config.json + safetensors) or a jaxtune run / params
checkpoint. Overrides are generate's (``sampling.*``, ``tokenizer.*``, ``model.*`` numerics,
``seed``); ``sampling.max_new_tokens`` defaults to 256 here. Each reply is printed to stdout (with
``--json``, one object per reply and nothing else: reply, tokens, log_probs, stopped, and the cached
tokens ``reused`` and new ones ``prefilled``); notes and the ``> `` prompt (only when stdin is a
terminal) go to stderr. ``/reset`` starts a new conversation, ``/exit`` or end of input ends. The KV
cache is kept across turns (`jaxtune.generate.chat`): a turn prefills only the tokens the
conversation gained since the last reply. A turn that does not fit ``--max-len`` tokens starts a
fresh conversation, said on stderr; nothing is truncated.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax

from jaxtune.cli.generate import chat_sampling, load_job, sampling_for
from jaxtune.config import ConfigError, load_config
from jaxtune.generate.chat import ContextFull, chat_turn, render_ids, require_chat_template, reset_chat, start_chat
from jaxtune.job import JobConfig
from jaxtune.models import Model

DEFAULT_MAX_NEW_TOKENS = 256
NOT_HERE = ("prompts", "messages", "model.hf_dir", "model.checkpoint", "model.preset", "model.config")


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model, one message per line of stdin")
    p.add_argument("run", help="a Hugging Face model directory or a jaxtune run / params checkpoint")
    p.add_argument("args", nargs="*", help="key=value overrides (sampling.*, tokenizer.*, model.dtype, seed, ...)")
    p.add_argument("--system", default=None, help="a system message that opens every conversation")
    p.add_argument("--json", action="store_true", help="print one JSON object per reply (and nothing else on stdout)")
    p.add_argument("--max-len", type=int, default=None,
                   help="tokens a conversation may hold (default: the model's max_position_embeddings)")
    p.set_defaults(func=run)


def source_override(run_dir: str) -> str:
    """``model.hf_dir=RUN`` for a Hugging Face directory (config.json + safetensors), else ``model.checkpoint=RUN``."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such directory (give a Hugging Face model directory or a jaxtune run)")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return f"model.hf_dir={run_dir}"
    return f"model.checkpoint={run_dir}"


def load_chat_job(run_dir: str, overrides: list[str]) -> JobConfig:
    """The job for RUN: its weights, chat's default max_new_tokens, then the user's overrides."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item:
            raise ConfigError(f"unexpected argument {item!r}: give key=value overrides after RUN")
        if any(key == k or key.startswith(k + ".") for k in NOT_HERE):
            raise ConfigError(f"config key {key!r} is not for jaxtune chat: RUN names the model and the messages "
                              "come from stdin")
    job = load_config(JobConfig, None, [source_override(run_dir), f"sampling.max_new_tokens={DEFAULT_MAX_NEW_TOKENS}",
                                        *overrides])
    if job.sampling.slide:
        raise ConfigError("sampling.slide is not supported in chat: a conversation ends when it fills --max-len tokens")
    return job


def run(args) -> int:
    job = load_chat_job(args.run, args.args)
    params, cfg, tokenizer, where = load_job(job)
    require_chat_template(tokenizer, str(where))
    sampling = sampling_for(job, cfg, tokenizer)
    sampling = chat_sampling(tokenizer, sampling)
    model = Model(cfg)
    opening = [] if args.system is None else [{"role": "system", "content": args.system}]
    state = start_chat(model, params, args.max_len)
    history, rng = list(opening), jax.random.key(job.seed)
    noted, turns, tokens, start = False, 0, 0, time.perf_counter()
    while (line := _read_line()) is not None:
        text = line.rstrip("\r\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history, state = list(opening), reset_chat(state)
            _note("new conversation")
            continue
        if not text.strip():
            continue
        rng, key = jax.random.split(rng)
        answered = _answer(model, state, tokenizer, history, opening, text, key, sampling)
        if answered is None:
            history, state = list(opening), reset_chat(state)
            continue
        turn, messages = answered
        same_conversation = len(messages) == len(history) + 1
        if same_conversation and turn.reused < len(state.ids) and not noted:
            _note(f"the chat template renders the conversation differently from the tokens in the cache (from token "
                  f"{turn.reused} of {len(state.ids)}); re-prefilling from there (said once)")
            noted = True
        reply = tokenizer.decode([t for t in turn.tokens if t not in sampling.stop_tokens])
        history, state = messages + [{"role": "assistant", "content": reply}], turn.state
        turns, tokens = turns + 1, tokens + len(turn.tokens)
        if args.json:
            print(json.dumps({"reply": reply, "tokens": turn.tokens, "log_probs": turn.log_probs,
                              "stopped": turn.stopped, "reused": turn.reused, "prefilled": turn.prefilled}), flush=True)
        else:
            print(reply, flush=True)
    seconds = time.perf_counter() - start
    _note(f"[{cfg.family}, {turns} replies, {tokens} tokens in {seconds:.2f}s including compilation]")
    return 0


def _answer(model, state, tokenizer, history, opening, text, key, sampling):
    """-> (turn, its messages) answering the user's ``text`` after ``history``; a conversation that
    cannot take it starts again from ``opening`` (said on stderr); None when even that cannot."""
    messages = history + [{"role": "user", "content": text}]
    try:
        return chat_turn(model, state, render_ids(tokenizer, messages), key, sampling), messages
    except ContextFull as err:
        if len(messages) == len(opening) + 1:
            _note(f"message not answered: {err}")
            return None
        _note(f"the conversation is full ({err}); starting a new conversation")
    return _answer(model, reset_chat(state), tokenizer, opening, opening, text, key, sampling)


def _read_line():
    """The next line of stdin (after a ``> `` prompt on stderr when stdin is a terminal); None at its end."""
    if sys.stdin.isatty():
        print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    return line or None


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
