"""Memory of a training job's step, per device, without allocating it: an estimate from the job's
abstract param tree and traced program, and XLA's own figure from compiling the real step.

`jaxtune.job.plan_step(job)` builds everything the loop would (model, quantization, PEFT,
trainable split, optimizer, shardings, loss) as abstract values (``jax.eval_shape``) into a
`StepPlan`, so an 8B model costs nothing but tracing. `estimate(plan)` then counts, per device:

- params: every leaf's bytes divided by how its PartitionSpec splits it (exact, quantized
  kernels at their packed size); trainable and frozen separately;
- gradients: the trainable half's bytes (plus the accumulator when ``grad_accum > 1``);
- optimizer state: the state's leaves, split like their parameters (exact);
- activations: the residuals JAX saves for the backward pass of one micro-batch under the
  configured remat policy (traced, not modelled by hand; blocks are alike, so one block and a
  second one are traced and the rest extrapolated), divided over the batch and sequence axes
  (``data`` x ``fsdp`` x ``context``) and, for tensors with a head / feed-forward dimension, ``tensor``;
- one block re-run: under a remat policy, the residuals of one block without remat, live while
  the backward pass recomputes it; with a chunked MLP, one chunk's working set; under context
  parallelism, one layer's gathered K/V and their float32 gradients;
- host: what ``remat: offload`` keeps in pinned host memory (the blocks' inputs);
- logits: the float32 gradient of the logits at the turn from forward to backward (the softmax
  is among the residuals), or one chunk's logits and gradient with ``train.loss_chunk_tokens``;
- peak: arguments (params, optimizer state, batch) + the larger of (activations + block re-run
  + logits) and (gradients + the updated trainable params).

Measured against XLA on this CPU (tests/train/test_memory.py, README): within 10% for full,
LoRA and QLoRA with float32 compute and remat none. XLA:CPU runs bf16 arithmetic in float32
(its float-normalization pass keeps f32 temporaries, so its figure is higher than the program's)
and it does not realise rematerialisation's savings (its pipeline expands the optimization
barriers before common-subexpression elimination, which then merges the backward pass's
recomputation with the forward pass: remat full compiles to about the same peak as none there),
so those are compared on accelerators, not here. At long context XLA:CPU also keeps float32
copies the program does not ask for (per-row broadcasts materialised by its YNN fusions, 2-D
copies of the norms' outputs for its GEMMs): at 8,192 and 16,384 tokens the estimate is 0.60 /
0.57 of its figure, and both grow linearly with the length (README, benchmarks/long_context.py).

`compiled(plan)` lowers and compiles the step with abstract inputs and returns XLA's
``memory_analysis()`` (arguments + outputs - aliased + temporaries), which works on this CPU
even for 8B shapes; ``jaxtune estimate --compiled`` prints both.

This module must not allocate device buffers for the model, nor change what the loop runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxtune.models import ModelConfig
from jaxtune.utils.platform import host_platform, traced_for
from jaxtune.parallel.mesh import BATCH_AXES
from jaxtune.train.config import TrainConfig
from jaxtune.train.step import make_train_step, named
from jaxtune.utils.moved import moved_names
from jaxtune.utils.partition import join

GiB = 2**30
__getattr__ = moved_names(__name__, {"plan_step": "jaxtune.job.plan_step", "abstract_model": "jaxtune.job.plan.abstract_model"})


@dataclass
class StepPlan:
    """A training step as abstract values (`jaxtune.job.plan_step` builds it from a job)."""

    train: TrainConfig
    cfg: ModelConfig
    params: Any  # abstract full tree
    trainable: Any
    frozen: Any
    state: Any  # abstract TrainState
    state_specs: Any
    frozen_specs: Any
    optimizer: Any
    schedule: Any
    loss_fn: Any
    mesh_shape: dict[str, int]
    mesh: Optional[Mesh]  # real devices, when this process has enough of them (needed to compile)
    with_layers: Callable[..., "StepPlan"]  # (n, remat="none"): the same step with n blocks under that remat policy
    # (rows, seq) -> the objective's batch arrays beyond the LM layout (labels, row_mask, token_types, ...)
    extra_batch: Callable[[int, int], dict] = lambda rows, seq: {}

    @property
    def micro_batch(self) -> int:
        return self.train.batch_size // self.train.grad_accum

    def at_length(self, seq_len: int) -> "StepPlan":
        """The same step at another sequence length (nothing re-planned: the params and the
        optimizer state do not depend on it)."""
        layers = self.with_layers
        return dataclasses.replace(self, train=dataclasses.replace(self.train, seq_len=seq_len),
                                   with_layers=lambda *a: layers(*a).at_length(seq_len))

    def batch(self, rows: int) -> dict:
        shape = (rows, self.train.seq_len)
        batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
        batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.float32)
        return {**batch, **self.extra_batch(rows, self.train.seq_len)}


def _per_device(tree: Any, specs: Any, mesh_shape: dict[str, int]) -> int:
    """Bytes of ``tree`` on one device when each leaf is split as its PartitionSpec says."""
    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    if len(leaves) != len(spec_leaves):
        raise ValueError(f"memory: {len(leaves)} arrays but {len(spec_leaves)} specs")
    total = 0
    for leaf, spec in zip(leaves, spec_leaves):
        split = 1
        for entry in spec:
            for name in (entry if isinstance(entry, tuple) else (entry,)):
                split *= mesh_shape.get(name, 1) if name else 1
        total += math.ceil(int(np.prod(leaf.shape)) / split) * jnp.dtype(leaf.dtype).itemsize
    return total


# Elementwise / layout ops that XLA fuses into their consumers (duplicating them if needed)
# rather than keeping their output in memory for the backward pass.
_FUSIBLE = frozenset({
    "reshape", "broadcast_in_dim", "convert_element_type", "squeeze", "expand_dims", "select_n", "mul", "add",
    "sub", "neg", "and", "or", "not", "eq", "ne", "lt", "gt", "le", "ge", "iota", "integer_pow", "max", "min",
    "copy", "copy_p", "stop_gradient", "abs", "sign",
})
_VIEWS = frozenset({"reshape", "squeeze", "expand_dims"})  # a view of a kept buffer shares it (a bitcast)


def saved_activations(fn, *args) -> list[tuple[tuple[int, ...], Any, str, bool]]:
    """(shape, dtype, producing op, on host) of every value ``fn``'s backward pass keeps in memory;
    on host: offloaded to host memory by the remat policy (``remat: offload``).

    The residuals are those of ``jax.vjp(fn, *args)`` under whatever remat policy ``fn`` uses
    (traced, no compilation). Left out: the arguments themselves, and residuals XLA does not
    materialise -- outputs of elementwise / layout ops (`_FUSIBLE`) whose inputs are
    themselves kept or are arguments, which XLA fuses into the backward consumer (a mask from
    iota and compares is recomputed) -- and counts a buffer once, however many reshaped views
    of it are kept (`_VIEWS`: bitcasts)."""
    leaves = jax.tree.leaves(args)
    with traced_for(host_platform()):  # one implementation per op, not every platform's
        closed, shapes = jax.make_jaxpr(
            lambda *xs: jax.vjp(lambda *ys: fn(*jax.tree.unflatten(jax.tree.structure(args), ys)), *xs),
            return_shape=True)(*leaves)
    jaxpr = closed.jaxpr
    n_res = len(jax.tree.leaves(shapes[1]))
    residuals = [v for v in jaxpr.outvars[len(jaxpr.outvars) - n_res:] if not hasattr(v, "val")]  # no literals
    producer = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}

    def view_root(v):  # a reshape of a buffer is that buffer (a bitcast): count the buffer once
        eqn = producer.get(v)
        while eqn is not None and eqn.primitive.name in _VIEWS and not hasattr(eqn.invars[0], "val"):
            v = eqn.invars[0]
            eqn = producer.get(v)
        return v

    residuals = [view_root(v) for v in residuals]
    inputs = set(jaxpr.invars) | set(jaxpr.constvars)
    kept = set(residuals)
    free: dict[Any, bool] = {}

    def available(v) -> bool:  # can the backward read or cheaply rebuild v without storing it?
        if hasattr(v, "val") or v in inputs:
            return True  # a literal or an argument
        if v in free:
            return free[v]
        eqn = producer.get(v)
        free[v] = False  # (no cycles in a jaxpr; guards the recursion)
        free[v] = eqn is not None and eqn.primitive.name in _FUSIBLE and all(
            hasattr(u, "val") or (u in kept and not fusible_residual(u)) or available(u) for u in eqn.invars)
        return free[v]

    def fusible_residual(v) -> bool:
        eqn = producer.get(v)
        return eqn is not None and eqn.primitive.name in _FUSIBLE

    out, seen = [], set()
    for v in residuals:
        if v in seen or v in inputs:
            continue
        seen.add(v)
        if available(v):
            continue
        eqn = producer.get(v)
        out.append((tuple(v.aval.shape), v.aval.dtype, eqn.primitive.name if eqn is not None else "?", _on_host(v.aval)))
    return out


def _on_host(aval) -> bool:
    return getattr(getattr(aval, "memory_space", None), "name", "Device") == "Host"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device (``host``: per device's share of host memory, for ``remat: offload``)."""

    params: int
    trainable: int
    frozen: int
    gradients: int
    optimizer: int
    activations: int
    recompute: int
    logits: int
    batch: int
    peak: int
    host: int = 0

    def rows(self) -> list[tuple[str, int]]:
        return [("params (all)", self.params), ("  trainable", self.trainable), ("  frozen", self.frozen),
                ("gradients", self.gradients), ("optimizer state", self.optimizer),
                ("activations (saved for backward)", self.activations),
                ("one block re-run (remat)", self.recompute), ("logits (float32, for the loss)", self.logits),
                ("batch", self.batch), ("peak", self.peak),
                ("host memory (offloaded activations)", self.host)]


def estimate(plan: StepPlan) -> MemoryEstimate:
    """The per-device memory of the planned step (see the module docstring)."""
    ms, cfg, t = plan.mesh_shape, plan.cfg, plan.train
    trainable = _per_device(plan.trainable, plan.state_specs.params, ms)
    frozen = _per_device(plan.frozen, plan.frozen_specs, ms)
    optimizer = _per_device(plan.state.opt_state, plan.state_specs.opt_state, ms)
    batch_split = ms["data"] * ms["fsdp"]
    token_split = batch_split * ms.get("context", 1)
    gradients = trainable * (2 if t.grad_accum > 1 else 1)
    activations, host = _model_activations(plan)
    # Under a remat policy the backward pass re-runs one block at a time: its residuals (those of
    # the block without remat) are live on top of what the policy keeps. A chunked MLP re-runs one
    # chunk at a time inside it: its [chunk, intermediate] values (up, gate, their product, the
    # activation's input gradient) and the chunk's input and output.
    working = _block_residuals(plan) if cfg.remat != "none" else 0
    if cfg.mlp_chunk_tokens:
        chunk = min(cfg.mlp_chunk_tokens, math.ceil(plan.micro_batch * t.seq_len / token_split))
        width = math.ceil(cfg.intermediate_size / ms["tensor"])
        working += chunk * (4 * width + 2 * cfg.hidden_size) * jnp.dtype(cfg.dtype).itemsize
    if ms.get("context", 1) > 1:
        # context parallelism: one layer's keys / values gathered over the whole sequence (compute
        # dtype) and, in its backward pass, their float32 gradients before the reduce-scatter
        rows = math.ceil(plan.micro_batch / batch_split)
        kv = math.ceil(cfg.num_kv_heads / ms["tensor"]) * cfg.head_dim
        working += rows * t.seq_len * kv * 2 * (jnp.dtype(cfg.dtype).itemsize + 4)
    tokens = math.ceil(plan.micro_batch * t.seq_len / token_split)
    vocab = math.ceil(cfg.vocab_size / ms["tensor"])
    # d(logits) in float32 (the softmax itself is a residual); a chunked loss holds one chunk's
    # logits and their gradient at a time.
    logits = 2 * min(tokens, t.loss_chunk_tokens) * vocab * 4 if t.loss_chunk_tokens else tokens * vocab * 4
    batch = math.ceil(t.batch_size * t.seq_len * 4 * 5 / token_split)
    params = trainable + frozen
    peak = params + optimizer + batch + max(activations + working + logits, gradients + trainable)
    return MemoryEstimate(params=params, trainable=trainable, frozen=frozen, gradients=gradients, optimizer=optimizer,
                          activations=activations, recompute=working, logits=logits, batch=batch, peak=peak, host=host)


def _model_activations(plan: StepPlan, exact: bool = False) -> tuple[int, int]:
    """`_activations` of the whole model. Blocks are alike, so what n blocks keep is what one block
    keeps plus (n - 1) times what a second one adds: traced with 1 and 2 blocks under the same remat
    policy (seconds for an 8B model instead of a minute), or the whole model with ``exact``."""
    layers = plan.cfg.num_layers
    if exact or layers <= 2:
        return _activations(plan, plan.loss_fn)
    one, two = (plan.with_layers(n, plan.cfg.remat) for n in (1, 2))
    (d1, h1), (d2, h2) = _activations(one, one.loss_fn), _activations(two, two.loss_fn)
    return d1 + (layers - 1) * (d2 - d1), h1 + (layers - 1) * (h2 - h1)


def _block_residuals(plan: StepPlan) -> int:
    """Per-device residuals of one block without remat: the same job with 2 blocks minus 1 block
    (all of them on the device: a block being re-run has its input back)."""
    def with_layers(n: int) -> int:
        small = plan.with_layers(n)
        return sum(_activations(small, small.loss_fn))

    return max(with_layers(2) - with_layers(1), 0)


def _activations(plan: StepPlan, loss_fn) -> tuple[int, int]:
    """Per-device bytes of what ``loss_fn``'s backward keeps for one micro-batch (`saved_activations`),
    as (on the device, offloaded to host). A residual whose size doubles with the micro-batch
    (traced a second time at twice the rows) is split over the batch axes (``data`` x ``fsdp``)
    and the sequence axis (``context``), whatever its layout; one with a head / feed-forward
    dimension also over ``tensor``; the rest (e.g. from weights) is not split."""
    ms, cfg = plan.mesh_shape, plan.cfg

    def trace(rows):
        return saved_activations(lambda tr, fr, b: loss_fn(join(tr, fr), b, None)[0],
                                 plan.trainable, plan.frozen, plan.batch(rows))

    one, two = trace(plan.micro_batch), trace(2 * plan.micro_batch)
    paired = len(one) == len(two)
    tensor_dims = {cfg.intermediate_size, cfg.num_heads, cfg.num_heads * cfg.head_dim}
    if cfg.num_kv_heads > 1:
        tensor_dims |= {cfg.num_kv_heads, cfg.num_kv_heads * cfg.head_dim}
    device = host = 0
    for i, (shape, dtype, _, on_host) in enumerate(one):
        size = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
        if not paired or int(np.prod(two[i][0])) != int(np.prod(shape)):  # grows with the batch
            size = math.ceil(size / (ms["data"] * ms["fsdp"] * ms.get("context", 1)))
            if ms["tensor"] > 1 and any(d in tensor_dims for d in shape):
                size = math.ceil(size / ms["tensor"])
        if on_host:
            host += size
        else:
            device += size
    return device, host


def longest_context(plan: StepPlan, budgets: list[int], multiple: int = 128,
                    limit: int = 1 << 24) -> list[tuple[int, Optional[MemoryEstimate]]]:
    """For each budget (bytes per device), the longest ``train.seq_len`` (a multiple of ``multiple``,
    at most ``limit``) whose estimated peak fits, and that estimate; (0, None) where not even
    ``multiple`` tokens fit. A search over the estimate: peaks at two lengths give an affine guess,
    the estimate is then evaluated around it and the bracket bisected (each length estimated once
    for all budgets)."""
    peaks: dict[int, MemoryEstimate] = {}

    def at(length: int) -> MemoryEstimate:
        if length not in peaks:
            peaks[length] = estimate(plan.at_length(length))
        return peaks[length]

    fits = lambda length, budget: at(length).peak <= budget  # noqa: E731
    # peak = fixed + batch(L) + max(forward(L), update) (`estimate`): both branches affine in L once L
    # passes the chunk sizes, so the guess is where the first of them reaches the budget
    l1, l2 = 32 * multiple, 64 * multiple
    branches = lambda e: (e.batch + e.activations + e.recompute + e.logits, e.batch + e.gradients + e.trainable)  # noqa: E731
    fixed = at(l1).params + at(l1).optimizer
    slopes = [(b2 - b1) / (l2 - l1) for b1, b2 in zip(branches(at(l1)), branches(at(l2)))]
    limit = limit // multiple * multiple
    out = []
    for budget in budgets:
        if not fits(multiple, budget):
            out.append((0, None))
            continue
        guesses = [(budget - fixed - b1) / slope + l1 if slope > 0 else limit
                   for b1, slope in zip(branches(at(l1)), slopes)]
        guess = max(multiple, min(limit, int(min(guesses))) // multiple * multiple)
        lo, hi, step = multiple, None, multiple
        if fits(guess, budget):  # search up from the guess for a length that does not fit
            lo = guess
            while hi is None:
                if lo + step > limit or not fits(lo + step, budget):
                    hi = min(lo + step, limit + multiple)
                else:
                    lo, step = lo + step, step * 2
        else:  # down from the guess for one that fits
            hi = guess
            while guess - step > multiple and not fits(guess - step, budget):
                hi, step = guess - step, step * 2
            lo = max(multiple, guess - step)
        while hi - lo > multiple:  # fits(lo), not fits(hi)
            mid = (lo + hi) // 2 // multiple * multiple
            lo, hi = (mid, hi) if fits(mid, budget) else (lo, mid)
        out.append((lo, at(lo)))
    return out


def with_shardings(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct``s of ``tree``'s leaves, each with its sharding."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def sharded_train_step(plan: StepPlan) -> tuple[Callable, tuple]:
    """The jitted train step on the plan's mesh, as the loop builds it, and its abstract sharded
    arguments (state, frozen params, batch). Needs as many devices as the mesh (e.g.
    XLA_FLAGS=--xla_force_host_platform_device_count=8)."""
    if plan.mesh is None:
        raise ValueError(f"a mesh of {int(np.prod(list(plan.mesh_shape.values())))} devices needs that many devices; "
                         f"this process has {jax.device_count()} "
                         "(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    mesh = plan.mesh
    state_sh, frozen_sh = named(plan.state_specs, mesh), named(plan.frozen_specs, mesh)
    batch_sh = NamedSharding(mesh, P(BATCH_AXES))
    step = make_train_step(plan.loss_fn, plan.optimizer, plan.schedule, grad_accum=plan.train.grad_accum, mesh=mesh,
                           state_shardings=state_sh, frozen_shardings=frozen_sh, batch_shardings=batch_sh)
    batch = plan.batch(plan.train.batch_size)
    return step, (with_shardings(plan.state, state_sh), with_shardings(plan.frozen, frozen_sh),
                  with_shardings(batch, jax.tree.map(lambda _: batch_sh, batch)))


def compiled(plan: StepPlan) -> dict[str, int]:
    """XLA's memory analysis of the real train step compiled with abstract inputs, per device:
    arguments, outputs, aliased (donated), temporaries, and peak = arguments + outputs - aliased
    + temporaries. Needs as many devices as the mesh (`sharded_train_step`)."""
    step, args = sharded_train_step(plan)
    analysis = step.lower(*args).compile().memory_analysis()
    out = {"arguments": int(analysis.argument_size_in_bytes), "outputs": int(analysis.output_size_in_bytes),
           "aliased": int(analysis.alias_size_in_bytes), "temporaries": int(analysis.temp_size_in_bytes)}
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out
