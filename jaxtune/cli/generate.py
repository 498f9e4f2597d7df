"""`jaxtune generate [CONFIG] [key=value ...]`: decode prompts from an HF directory, an Orbax
checkpoint or a random preset, and print the completions."""

from __future__ import annotations

import dataclasses
import json
import time

import jax

from jaxtune.cli.args import split_config_args
from jaxtune.config import load_config
from jaxtune.data import load_tokenizer
from jaxtune.generate import generate, left_pad
from jaxtune.job import JobConfig, load_model
from jaxtune.models import Model


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a model")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] key=value ... (e.g. model.hf_dir=DIR prompts='[\"Hi\"]')")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=run)


def run(args) -> int:
    config_path, overrides = split_config_args(args.args)
    job = load_config(JobConfig, config_path, overrides)
    params, cfg, model_dir = load_model(job.model)
    tokenizer = load_tokenizer(job.tokenizer.path or model_dir, job.tokenizer.kind)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}")
    sampling = job.sampling
    if not sampling.stop_tokens:
        stops = cfg.eos_token_id or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
        sampling = dataclasses.replace(sampling, stop_tokens=tuple(stops))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (cfg.pad_token_id or 0)
    sampling = dataclasses.replace(sampling, pad_token_id=int(pad))
    add_bos = cfg.bos_token_id is not None and cfg.family != "gpt2"
    prompts = [tokenizer.encode(p, add_bos=add_bos) for p in job.prompts]
    tokens, mask = left_pad(prompts, pad_token_id=sampling.pad_token_id)
    start = time.perf_counter()
    out = generate(Model(cfg), params, tokens, mask, jax.random.key(job.seed), sampling)
    out = jax.device_get(out)
    seconds = time.perf_counter() - start
    for i, prompt in enumerate(job.prompts):
        new = out.tokens[i, : out.lengths[i]].tolist()
        text = tokenizer.decode([t for t in new if t not in sampling.stop_tokens])
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text, "tokens": new,
                              "log_probs": out.log_probs[i, : out.lengths[i]].tolist()}))
        else:
            print(f"--- prompt {i}: {prompt!r}\n{prompt}{text}")
    total = int(out.lengths.sum())
    print(f"[{cfg.family}, {total} tokens in {seconds:.2f}s including compilation]", flush=True)
    return 0
