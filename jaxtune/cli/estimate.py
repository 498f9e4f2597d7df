"""`jaxtune estimate [CONFIG] [key=value ...] [--batch B --seq S]`: exact parameter count and the
memory of weights, gradients, AdamW state and the KV cache, without allocating any of them."""

from __future__ import annotations

import jax
import numpy as np

from jaxtune.config import JobConfig, load_config
from jaxtune.interop.hf_config import from_hf_config
from jaxtune.interop.hf_weights import read_config
from jaxtune.models import Model
from jaxtune.models.presets import preset


def add_parser(sub) -> None:
    p = sub.add_parser("estimate", help="parameter count and memory of a model, without loading it")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] key=value ...")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.set_defaults(func=run)


def _gib(n: float) -> str:
    return f"{n / 2**30:8.3f} GiB"


def run(args) -> int:
    from jaxtune.checkpoint import load_model_config
    from jaxtune.cli.main import split_config_args

    config_path, overrides = split_config_args(args.args)
    source = load_config(JobConfig, config_path, overrides).model
    numerics = dict(param_dtype=source.param_dtype, dtype=source.dtype)
    if source.hf_dir:
        cfg = from_hf_config(read_config(source.hf_dir), **numerics)
    elif source.checkpoint:
        cfg = load_model_config(source.checkpoint).replace(**numerics)
    else:
        cfg = (preset(source.preset) if source.preset else source.config).replace(**numerics)
    shapes = jax.eval_shape(Model(cfg).init, jax.random.key(0))
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    weight_bytes = sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(shapes))
    kv = 2 * cfg.num_layers * args.batch * args.seq * cfg.num_kv_heads * cfg.head_dim * np.dtype(cfg.dtype).itemsize
    print(f"model        {cfg.family}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")
    print(f"parameters   {n:,}")
    print(f"weights      {_gib(weight_bytes)}  ({cfg.param_dtype})")
    print(f"full fine-tune, fp32 master + grads + AdamW moments: {_gib(16 * n)}")
    print(f"KV cache     {_gib(kv)}  (batch {args.batch} x {args.seq} tokens, {cfg.dtype})")
    print("activations are not included: they depend on remat policy and land with the training loop")
    return 0
