"""The jitted, sharded train step: gradient accumulation, non-finite guard, optimizer update.

``step(state, frozen, batch) -> (state, metrics)`` where ``state`` is a
`TrainState` (trainable params, optimizer state, step, RNG, skip counters),
``frozen`` the non-trainable half of the params (see `partition`) and
``batch`` a dict of ``[global_batch, ...]`` arrays. The step is one
``jax.jit`` with declared in/out shardings and the state donated.

Gradient accumulation splits the global batch into ``grad_accum``
micro-batches (row ``i`` goes to micro-batch ``i % grad_accum``, so every
micro-batch is spread over all data-parallel devices), sums loss, weight,
metrics and gradients over them in a ``lax.scan``, and divides by the total
weight once. A step whose loss or gradient norm is not finite leaves params
and optimizer state untouched and is counted.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxtune.parallel.mesh import BATCH_AXES
from jaxtune.parallel.rules import Rule, fit_spec, activation_mesh, param_specs
from jaxtune.train.losses import LossFn
from jaxtune.utils.partition import join, split


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32: batches consumed (applied + skipped)
    params: Any  # the trainable half of the param tree
    opt_state: Any
    rng: jax.Array  # uint32 key data (jax.random.key_data), so checkpoints hold plain arrays
    skipped: jax.Array  # int32: non-finite steps skipped in total
    streak: jax.Array  # int32: non-finite steps skipped in a row (0 after a good step)

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
        """A fresh state. Every leaf is its own buffer (the step donates the state, so nothing in
        it may alias the caller's arrays or another leaf)."""
        own = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731  (copies outside jit, free inside)
        zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
        return cls(step=zero(), params=own(params), opt_state=own(optimizer.init(params)),
                   rng=own(jax.random.key_data(rng)), skipped=zero(), streak=zero())


def state_specs(state: TrainState, optimizer: optax.GradientTransformation, mesh: Mesh, rules: tuple[Rule, ...] = ()) -> TrainState:
    """PartitionSpecs for a (possibly abstract) `TrainState`: params by the rules, optimizer
    moments like the param they belong to (fitted to their own shape), everything else replicated."""
    p_specs = param_specs(state.params, mesh, rules)
    mesh_shape = dict(mesh.shape)
    is_spec = lambda x: isinstance(x, P)  # noqa: E731

    def moment_spec(leaf, spec):
        return fit_spec(spec, tuple(getattr(leaf, "shape", ())), mesh_shape)

    opt_specs = optax.tree_utils.tree_map_params(
        optimizer, moment_spec, state.opt_state, p_specs,
        transform_non_params=lambda _: P(), is_leaf=is_spec,
    )
    return TrainState(step=P(), params=p_specs, opt_state=opt_specs, rng=P(), skipped=P(), streak=P())


def abstract_layout(abstract_params: Any, trainable_mask: Any, optimizer: optax.GradientTransformation,
                    mesh: Mesh, rules: tuple[Rule, ...] = (), rng: Optional[jax.Array] = None):
    """The abstract pieces of a train step, without allocating anything: -> (trainable half,
    frozen half, `TrainState`, state PartitionSpecs, frozen PartitionSpecs). The loop builds its
    shardings from these; the memory estimator compiles the step from them."""
    trainable, frozen = split(abstract_params, trainable_mask)
    rng = jax.random.key(0) if rng is None else rng
    state = jax.eval_shape(lambda p: TrainState.create(p, optimizer, rng), trainable)
    return trainable, frozen, state, state_specs(state, optimizer, mesh, rules), param_specs(frozen, mesh, rules)


def named(specs: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def split_micro_batches(batch: dict, grad_accum: int) -> dict:
    """[global, ...] -> [grad_accum, global / grad_accum, ...]; micro-batch i holds rows i, i+A, i+2A, ..."""

    def split(x):
        if x.shape[0] % grad_accum:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {grad_accum} micro-batches")
        x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: LossFn, trainable: Any, frozen: Any, batch: dict, rng: jax.Array, grad_accum: int, mesh: Optional[Mesh] = None):
    """-> (loss_sum, weight, metric_sums, grad_sum) over ``grad_accum`` micro-batches (sums, not means)."""

    def micro(trainable, mb, key):
        total, weight, metrics = loss_fn(join(trainable, frozen), mb, key)
        return total, (weight, metrics)

    grad_fn = jax.value_and_grad(micro, has_aux=True)
    if grad_accum == 1:
        (total, (weight, metrics)), grads = grad_fn(trainable, batch, rng)
        return total, weight, metrics, grads

    micro_batches = split_micro_batches(batch, grad_accum)
    if mesh is not None:
        micro_batches = jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, BATCH_AXES))), micro_batches
        )
    keys = jax.random.split(rng, grad_accum)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    shapes = jax.eval_shape(grad_fn, trainable, first, keys[0])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(carry, xs):
        mb, key = xs
        out = grad_fn(trainable, mb, key)
        return jax.tree.map(jnp.add, carry, out), None

    ((total, (weight, metrics)), grads), _ = jax.lax.scan(body, zeros, (micro_batches, keys))
    return total, weight, metrics, grads


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    schedule: Optional[optax.Schedule] = None,
    *,
    grad_accum: int = 1,
    mesh: Optional[Mesh] = None,
    state_shardings: Any = None,
    frozen_shardings: Any = None,
    batch_shardings: Any = None,
    opt_device_shardings: Any = None,
    steps_per_call: int = 1,
) -> Callable[[TrainState, Any, dict], tuple[TrainState, dict]]:
    """Build the jitted step. Without a mesh the shardings are left to jit (single device).

    ``opt_device_shardings``: the optimizer state is offloaded (``state_shardings.opt_state`` in
    host memory); the step streams it to these device shardings for the update and back.
    ``steps_per_call > 1``: the returned function takes batches stacked on a new leading axis
    (``[n, batch, ...]``, any n) and runs n optimizer steps in one call (a `lax.scan` of the same
    step), returning the final state and every step's metrics stacked (``[n]``). ``batch_shardings``
    then describes one batch (the stack axis is added, unsharded)."""
    if steps_per_call < 1:
        raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")

    def step(state: TrainState, frozen: Any, batch: dict):
        if opt_device_shardings is not None:
            state = state.replace(opt_state=jax.device_put(state.opt_state, opt_device_shardings))
        with activation_mesh(mesh):
            rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
            total, weight, metric_sums, grads = accumulate_gradients(
                loss_fn, state.params, frozen, batch, step_rng, grad_accum, mesh
            )
            denom = jnp.maximum(weight, 1e-6)
            loss = total / denom
            grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)  # bf16 params keep bf16 grads
            grad_norm = optax.tree.norm(grads)
            updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
            # Finite gradients can still give a non-finite update (overflow in the optimizer).
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
            params, opt_state = jax.lax.cond(
                finite,
                lambda: (optax.apply_updates(state.params, updates), new_opt_state),
                lambda: (state.params, state.opt_state),
            )
            skipped = jnp.where(finite, 0, 1).astype(jnp.int32)
            applied_steps = state.step - state.skipped
            new_state = TrainState(
                step=state.step + 1, params=params, opt_state=opt_state, rng=jax.random.key_data(rng),
                skipped=state.skipped + skipped, streak=jnp.where(finite, 0, state.streak + 1).astype(jnp.int32),
            )
            metrics = {
                "loss": loss, "grad_norm": grad_norm, "tokens": weight, "finite": finite,
                "skipped": new_state.skipped, "streak": new_state.streak,
                **{k: v / denom for k, v in metric_sums.items()},
            }
            if schedule is not None:
                metrics["lr"] = schedule(applied_steps)
            if opt_device_shardings is not None:
                new_state = new_state.replace(opt_state=jax.device_put(new_state.opt_state, state_shardings.opt_state))
            return new_state, metrics

    def several(state: TrainState, frozen: Any, batches: dict):
        return jax.lax.scan(lambda s, batch: step(s, frozen, batch), state, batches)

    fn = step if steps_per_call == 1 else several
    if steps_per_call > 1:
        if batch_shardings is not None:
            batch_shardings = jax.tree.map(lambda s: NamedSharding(s.mesh, P(None, *s.spec)), batch_shardings,
                                           is_leaf=lambda x: isinstance(x, NamedSharding))
    if mesh is None:
        return jax.jit(fn, donate_argnums=(0,))
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        fn,
        in_shardings=(state_shardings, frozen_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


def make_eval_step(loss_fn: LossFn, *, mesh: Optional[Mesh] = None, params_shardings: Any = None, batch_shardings: Any = None):
    """``eval_step(params, batch) -> {'loss_sum', 'weight', metric sums}`` (sums, for exact averaging).
    The loss runs deterministically (``rng=None``: no dropout)."""

    def eval_step(params, batch):
        with activation_mesh(mesh):
            total, weight, metrics = loss_fn(params, batch, None)
            return {"loss_sum": total, "weight": weight, **metrics}

    if mesh is None:
        return jax.jit(eval_step)
    return jax.jit(eval_step, in_shardings=(params_shardings, batch_shardings), out_shardings=NamedSharding(mesh, P()))
