"""Train-step time and trainable fraction of PEFT methods vs full fine-tuning, side by side.

    python benchmarks/peft_step_time.py [--preset bench-llama-31m] [--batch 8] [--seq 256] [--rounds 6]
                                        [--methods full,lora-qv,lora-all,dora-all,qlora-all,ia3,prefix]

One model (random weights), one batch, the same jitted train step the loop uses
(`jaxtune.train.step.make_train_step`: forward, backward over the trainable half only,
AdamW) for each method. Steps are timed round-robin (one step of every method per round,
``--rounds`` rounds after two warm-up steps each), so machine noise hits all methods alike;
reported: median step time, its ratio to full fine-tuning, trainable scalars (and % of all),
and the bytes of trainable params + AdamW moments (what the optimizer side costs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtune.models import Model
from jaxtune.models.presets import preset
from jaxtune.peft.config import PeftConfig, apply_peft, peft_mask
from jaxtune.peft.lora import LoraConfig
from jaxtune.quant import QuantConfig, quantize
from jaxtune.train.losses import causal_lm_loss
from jaxtune.train.step import TrainState, make_train_step
from jaxtune.utils.partition import count, split

METHODS = {
    "full": None,
    "lora-qv": dict(lora=LoraConfig(rank=8, alpha=16, targets=("attention-qv",))),
    "lora-all": dict(lora=LoraConfig(rank=16, alpha=32, targets=("all-linear",))),
    "dora-all": dict(lora=LoraConfig(rank=16, alpha=32, targets=("all-linear",), dora=True)),
    # QLoRA: the same LoRA over NF4 + double-quantized kernels (dequantized inside the linear op)
    "qlora-all": dict(quant=QuantConfig(), lora=LoraConfig(rank=16, alpha=32, targets=("all-linear",))),
}


def optional_methods() -> dict:
    """Methods whose configs live in modules that may take extra arguments (added when present)."""
    extra = {}
    try:
        from jaxtune.peft.ia3 import IA3Config

        extra["ia3"] = dict(ia3=IA3Config())
    except ImportError:
        pass
    try:
        from jaxtune.peft.prompt import PrefixTuningConfig

        extra["prefix"] = dict(prefix_tuning=PrefixTuningConfig(num_virtual_tokens=16))
    except ImportError:
        pass
    return extra


def build(name, spec, base, cfg, batch):
    loss_fn = causal_lm_loss(Model(cfg))
    if spec is None:
        params, mask = base, jax.tree.map(lambda _: True, base)
    else:
        spec = dict(spec)
        quant = spec.pop("quant", None)
        params = apply_peft(base if quant is None else quantize(base, quant), PeftConfig(**spec), model_cfg=cfg)
        mask = peft_mask(params, PeftConfig(**spec))
    trainable, frozen = split(params, mask)
    optimizer = optax.adamw(1e-4, weight_decay=0.1)
    state = TrainState.create(trainable, optimizer, jax.random.key(0))
    step = make_train_step(loss_fn, optimizer)
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if hasattr(x, "nbytes"))
    info = dict(trainable=count(trainable), total=count(params),
                optimizer_side_mb=(opt_bytes + sum(x.nbytes for x in jax.tree.leaves(trainable))) / 2**20)
    return step, state, frozen, info


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-llama-31m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--methods", default=None, help="comma-separated subset of: " + ",".join(METHODS))
    args = parser.parse_args()

    methods = {**METHODS, **optional_methods()}
    names = args.methods.split(",") if args.methods else list(methods)
    cfg = preset(args.preset)
    base = jax.jit(Model(cfg).init)(jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1))
    batch = {"tokens": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
             "loss_mask": jnp.ones((args.batch, args.seq), jnp.float32),
             "segment_ids": jnp.ones((args.batch, args.seq), jnp.int32)}

    runs = {}
    for name in names:
        step, state, frozen, info = build(name, methods[name], base, cfg, batch)
        t0 = time.perf_counter()
        for _ in range(2):  # compile + one warm step
            state, metrics = step(state, frozen, batch)
            jax.block_until_ready(metrics["loss"])
        info["first_two_steps_s"] = time.perf_counter() - t0
        runs[name] = [step, state, frozen, info, []]
    for _ in range(args.rounds):
        for name in names:
            step, state, frozen, info, times = runs[name]
            t0 = time.perf_counter()
            state, metrics = step(state, frozen, batch)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - t0)
            runs[name][1] = state

    print(f"{args.preset}: batch {args.batch} x seq {args.seq}, {jax.devices()[0].device_kind}, "
          f"{args.rounds} rounds (median step time)")
    print(f"{'method':10s} {'step s':>8s} {'vs full':>8s} {'trainable':>12s} {'% of all':>9s} {'opt-side MiB':>13s}")
    reference = statistics.median(runs[names[0]][4]) if names[0] == "full" else None
    for name in names:
        info, times = runs[name][3], runs[name][4]
        med = statistics.median(times)
        ratio = f"{med / reference:8.2f}" if reference else f"{'-':>8s}"
        print(f"{name:10s} {med:8.3f} {ratio} {info['trainable']:12,d} {100 * info['trainable'] / info['total']:9.3f} "
              f"{info['optimizer_side_mb']:13.1f}")


if __name__ == "__main__":
    main()
