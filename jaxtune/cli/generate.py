"""`jaxtune generate [CONFIG] [key=value ...]`: decode prompts from an HF directory, an Orbax
checkpoint or a random preset, and print the completions.

``prompts=`` are continued as written; ``messages=`` (one conversation of {role, content} objects,
or a list of them) are rendered with the tokenizer's chat template and answered, a reply ending at
EOS or the template's end-of-turn token. With ``--json`` stdout holds one JSON object per prompt and
nothing else; the summary line goes to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import jax

from jaxtune.cli.args import split_config_args
from jaxtune.config import load_config
from jaxtune.data import load_tokenizer
from jaxtune.generate import generate, left_pad
from jaxtune.generate.chat import end_of_turn_ids, render_ids, render_text, require_chat_template
from jaxtune.job import JobConfig, load_model
from jaxtune.models import Model


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a model")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] key=value ... (e.g. model.hf_dir=DIR prompts='[\"Hi\"]' "
                                           "or messages='[{\"role\":\"user\",\"content\":\"Hi\"}]')")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt (and nothing else on stdout)")
    p.set_defaults(func=run)


def load_job(job: JobConfig):
    """-> (params, cfg, tokenizer, where the tokenizer came from) for ``job``, the tokenizer checked to fit."""
    params, cfg, model_dir = load_model(job.model)
    where = job.tokenizer.path or model_dir
    tokenizer = load_tokenizer(where, job.tokenizer.kind)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}")
    return params, cfg, tokenizer, where


def sampling_for(job: JobConfig, cfg, tokenizer):
    """``job.sampling`` with its stop tokens (default: the model's EOS, else the tokenizer's) and pad id set."""
    sampling = job.sampling
    if not sampling.stop_tokens:
        stops = cfg.eos_token_id or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
        sampling = dataclasses.replace(sampling, stop_tokens=tuple(stops))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (cfg.pad_token_id or 0)
    return dataclasses.replace(sampling, pad_token_id=int(pad))


def chat_sampling(tokenizer, sampling):
    """``sampling`` whose stop tokens also hold the chat template's end-of-turn token(s); a template
    that writes none is said on stderr (its replies end at EOS only)."""
    ends = end_of_turn_ids(tokenizer)
    if not ends:
        print("note: the chat template writes no special token after an assistant's reply; replies end at "
              f"sampling.stop_tokens {list(sampling.stop_tokens)} only", file=sys.stderr)
    return dataclasses.replace(sampling, stop_tokens=tuple(sorted(set(sampling.stop_tokens) | set(ends))))


def run(args) -> int:
    config_path, overrides = split_config_args(args.args)
    job = load_config(JobConfig, config_path, overrides)
    params, cfg, tokenizer, where = load_job(job)
    sampling = sampling_for(job, cfg, tokenizer)
    if job.messages is not None:
        require_chat_template(tokenizer, str(where))
        sampling = chat_sampling(tokenizer, sampling)
        texts = [render_text(tokenizer, conversation) for conversation in job.messages]
        prompts = [render_ids(tokenizer, conversation) for conversation in job.messages]
    else:
        add_bos = cfg.bos_token_id is not None and cfg.family != "gpt2"
        texts = list(job.prompts)
        prompts = [tokenizer.encode(p, add_bos=add_bos) for p in texts]
    tokens, mask = left_pad(prompts, pad_token_id=sampling.pad_token_id)
    start = time.perf_counter()
    out = jax.device_get(generate(Model(cfg), params, tokens, mask, jax.random.key(job.seed), sampling))
    seconds = time.perf_counter() - start
    for i, prompt in enumerate(texts):
        new = out.tokens[i, : out.lengths[i]].tolist()
        text = tokenizer.decode([t for t in new if t not in sampling.stop_tokens])
        if args.json:
            record = {"prompt": prompt, "completion": text, "tokens": new,
                      "log_probs": out.log_probs[i, : out.lengths[i]].tolist()}
            if job.messages is not None:
                record = {"messages": list(job.messages[i]), **record}
            print(json.dumps(record))
        elif job.messages is not None:
            print(f"--- conversation {i}: {job.messages[i][-1]['content']!r}\n{text}")
        else:
            print(f"--- prompt {i}: {prompt!r}\n{prompt}{text}")
    total = int(out.lengths.sum())
    sys.stdout.flush()
    print(f"[{cfg.family}, {total} tokens in {seconds:.2f}s including compilation]", file=sys.stderr, flush=True)
    return 0
