"""The one training loop (DESIGN contract 6).

``train(...)`` takes a loss function, params (or an init function), an
optimizer and a batch stream, and owns everything around them: the mesh and
declared shardings, the jitted step with gradient accumulation and the
non-finite guard, evaluation on a held-out stream, logging (progress bar,
JSONL, TensorBoard, MFU), Orbax checkpoints (resume exactly, keep-N, keep-best)
and stopping on request (SIGTERM, Ctrl-C: save, then stop; `jaxtune.train.stopping`). Pretraining, SFT, reward models and
preference losses are only different ``loss_fn`` + stream pairs; RL methods
add a rollout phase that produces the stream.

It must not know what the loss computes or where batches come from.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxtune.checkpoint.manager import CheckpointConfig, TrainCheckpointer
from jaxtune.models import ModelConfig
from jaxtune.parallel.collectives import allgather_json, any_process
from jaxtune.parallel.mesh import batch_sharding
from jaxtune.parallel.rules import Rule, param_specs
from jaxtune.train.batch_checks import check_batch_layout, check_positions, check_steps_per_call
from jaxtune.train.config import LoggingConfig, TrainConfig
from jaxtune.train.losses import LossFn
from jaxtune.train.metrics import MetricsLogger, batch_examples, device_peak_flops, mfu, model_flops_per_token
from jaxtune.utils.partition import count, join, mask_by_regex, split
from jaxtune.train.step import TrainState, abstract_layout, make_eval_step, make_train_step, named
from jaxtune.train.stopping import StopSignals

STEP_KEYS = frozenset({"loss", "grad_norm", "tokens", "finite", "skipped", "streak", "lr"})  # set by the step itself


class NonFiniteLossError(FloatingPointError):
    """Too many consecutive steps had a NaN/inf loss or gradient; the run stopped."""


@dataclass
class TrainResult:
    state: TrainState  # final train state (trainable params, optimizer state, counters)
    frozen: Any  # the frozen half of the params (None leaves where trainable)
    history: list[dict] = field(default_factory=list)  # one dict per step: step, loss, grad_norm, lr, ...
    evals: list[dict] = field(default_factory=list)
    status: str = "completed"  # completed | preempted (SIGTERM) | interrupted (Ctrl-C)
    first_step_s: Optional[float] = None  # wall time of this session's first step, compilation included
    resumed_from: Optional[int] = None
    trainable_params: int = 0  # scalars in the trainable half
    total_params: int = 0  # scalars in the whole param tree

    @property
    def params(self) -> Any:
        return join(self.state.params, self.frozen)


HOST_MEMORY = "pinned_host"


def host_shardings(shardings: Any, mesh: Mesh) -> Any:
    """``shardings`` moved to pinned host memory (train.offload_optimizer). Backends without that
    memory kind are refused with a message rather than silently keeping the state on device."""
    kinds = {m.kind for d in mesh.local_devices for m in d.addressable_memories()}
    if HOST_MEMORY not in kinds:
        platform = mesh.devices.flat[0].platform
        raise ValueError(f"train.offload_optimizer: the {platform} backend has no {HOST_MEMORY!r} memory "
                         f"(its memories: {sorted(kinds)}); the optimizer state cannot be offloaded here. "
                         "Set train.offload_optimizer=false, or use optim.name=adamw8bit to shrink it instead")
    return jax.tree.map(lambda s: s.with_memory_kind(HOST_MEMORY), shardings,
                        is_leaf=lambda x: isinstance(x, NamedSharding))


def place_batch(batch: dict, mesh: Mesh, local: bool = False, stacked: bool = False) -> dict:
    """Host numpy batch -> global jax arrays split over data x fsdp. ``local``: the batch holds
    only this process's rows (a host-sharded stream) and the processes' rows, in process
    order, make the global batch; otherwise every process holds the whole global batch and
    each fills its own devices' shards from it. ``stacked``: several batches on a leading axis
    (train.steps_per_call), which is not split."""
    sharding = batch_sharding(mesh)
    if stacked:
        sharding = NamedSharding(mesh, P(None, *sharding.spec))

    def put(x):
        x = np.asarray(x)
        if local:
            return jax.make_array_from_process_local_data(sharding, x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return {k: put(v) for k, v in batch.items()}


def is_process_local(batches: Any) -> bool:
    return bool(getattr(batches, "process_local", False))


def data_state(batches: Any) -> dict:
    """The stream's position, the same on every process: a host-sharded stream's per-process
    states are gathered and merged; any other stream must already agree across processes."""
    if not hasattr(batches, "get_state"):
        return {}
    state = batches.get_state()
    if jax.process_count() == 1:
        return state
    states = allgather_json(state)
    if hasattr(batches, "merge_states"):
        return batches.merge_states(states)
    if any(s != states[0] for s in states):
        raise RuntimeError("the data stream's position differs across processes; a stream that reads "
                           "per-process slices must say so (process_local) and merge its states")
    return state


@jax.jit
def _accumulate(totals: dict, out: dict) -> dict:
    """Compensated (Kahan) running sums on the device: {k: (sum, carry)} + {k: value}. Float32 sums
    over thousands of batches stay exact to rounding of the total, not of each addition."""
    result = {}
    for k, value in out.items():
        total, carry = totals[k]
        y = value.astype(jnp.float32) - carry
        t = total + y
        result[k] = (t, (t - total) - y)
    return result


def evaluate(eval_step: Callable, params: Any, batches: Iterable[dict], mesh: Mesh, max_batches: float,
             unit: str = "tokens") -> dict:
    """Weighted mean loss (and perplexity) over up to ``max_batches`` batches, with the total weight
    under ``unit`` (tokens; pairs for DPO...), the examples and batches it covers. The sums stay on
    the device and are fetched once at the end, so the host prepares the next batch while the
    device runs this one. A host-sharded stream may run dry on one process before another: it
    then contributes empty rows until every process is done, so all take part in every step."""
    totals = None
    local = is_process_local(batches)
    synced = local and jax.process_count() > 1
    iterator = iter(batches)
    n, examples = 0, 0
    while n < max_batches:
        batch = next(iterator, None)
        if synced:
            if not any_process(batch is not None):
                break
            if batch is None:
                batch = batches.empty_batch()
        elif batch is None:
            break
        examples += batch_examples(batch)
        out = eval_step(params, place_batch(batch, mesh, local))
        if totals is None:
            totals = jax.tree.map(lambda v: (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), out)
        totals = _accumulate(totals, out)
        n += 1
    if not n:
        return {}
    totals = {k: float(total) for k, (total, _) in jax.device_get(totals).items()}
    if totals.get("weight", 0.0) <= 0:
        return {}
    weight = totals.pop("weight")
    result = {"loss": totals.pop("loss_sum") / weight, unit: weight, "examples": examples, "batches": n}
    result.update({k: v / weight for k, v in totals.items()})
    if "nll" in result:
        result["perplexity"] = math.exp(min(result["nll"], 700.0))
    return result


def stack_batches(batches: Sequence[dict]) -> dict:
    """Batches of one stream -> one dict of arrays with a leading axis (one entry per batch)."""
    return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]}


def call_size(step: int, cfg: TrainConfig, checkpointer: TrainCheckpointer) -> int:
    """Optimizer steps in the next call: up to ``cfg.steps_per_call``, ending at the first step that
    saves or evaluates, or at the last step (so those happen at call boundaries)."""
    n = min(cfg.steps_per_call, cfg.steps - step)
    for i in range(1, n):
        if checkpointer.should_save(step + i) or (cfg.eval_every and (step + i) % cfg.eval_every == 0):
            return i
    return n


@dataclass
class _Setup:
    """The device side of a run, ready to step: state and frozen half on the mesh (fresh or
    restored), the jitted train and eval steps, and what the logs report about them."""

    state: TrainState
    frozen: Any
    step_fn: Callable
    eval_step: Optional[Callable]
    resumed_from: Optional[int]
    trainable_params: int
    total_params: int


def _set_up(loss_fn: LossFn, params: Any, optimizer: optax.GradientTransformation, schedule, cfg: TrainConfig,
            batches: Any, mesh: Mesh, eval_batches, checkpointer: TrainCheckpointer, trainable_mask: Any,
            rules: Sequence[Rule]) -> _Setup:
    """Split the params by the trainable mask, declare every sharding, restore the newest readable
    checkpoint (and the stream's position) or build a fresh state on the mesh, and jit the steps."""
    init_rng, state_rng = jax.random.split(jax.random.key(cfg.seed))
    abstract_params = jax.eval_shape(params, init_rng) if callable(params) else params
    if trainable_mask is None:
        trainable_mask = mask_by_regex(abstract_params, cfg.trainable)
    abs_trainable, _, abstract_state, state_spec, frozen_spec = abstract_layout(
        abstract_params, trainable_mask, optimizer, mesh, rules, state_rng)
    n_trainable, n_total = count(abs_trainable), count(abstract_params)
    if jax.process_index() == 0:
        print(f"trainable params: {n_trainable:,} of {n_total:,} ({100.0 * n_trainable / max(n_total, 1):.4f}%)",
              file=sys.stderr, flush=True)

    frozen_sh, state_sh = named(frozen_spec, mesh), named(state_spec, mesh)
    opt_device_sh = None
    if cfg.offload_optimizer:
        opt_device_sh = state_sh.opt_state
        state_sh = state_sh.replace(opt_state=host_shardings(opt_device_sh, mesh))

    def materialise(p):
        return p(init_rng) if callable(p) else p

    def fresh_state(p):
        trainable, frozen = split(materialise(p), trainable_mask)
        return TrainState.create(trainable, optimizer, state_rng), frozen

    def frozen_only(p):
        return split(materialise(p), trainable_mask)[1]

    restored = checkpointer.restore(
        _with_shardings(abstract_state.params, state_sh.params),
        _with_shardings(_state_extras(abstract_state), _state_extras(state_sh)),
    )
    params_sh = named(param_specs(abstract_params, mesh, rules, warn=False), mesh)
    if not callable(params):  # loaded weights (one device, or the host) go onto the mesh before they are split
        params = jax.device_put(params, params_sh)
    static = (0,) if callable(params) else ()
    resumed_from = None
    if restored is None:
        state, frozen = jax.jit(fresh_state, static_argnums=static, out_shardings=(state_sh, frozen_sh))(params)
    else:
        # Only the frozen half is built (no second copy of the trainable params and optimizer state).
        frozen = jax.jit(frozen_only, static_argnums=static, out_shardings=frozen_sh)(params)
        resumed_from, r_params, r_extras, saved_position = restored
        state = TrainState(params=r_params, **r_extras)
        if jax.process_index() == 0:
            print(f"resumed from step {resumed_from} of {cfg.steps} ({checkpointer.directory})", file=sys.stderr,
                  flush=True)
        if saved_position and hasattr(batches, "set_state"):
            batches.set_state(saved_position)

    data_sh = batch_sharding(mesh)
    step_fn = make_train_step(loss_fn, optimizer, schedule, grad_accum=cfg.grad_accum, mesh=mesh,
                              steps_per_call=cfg.steps_per_call,
                              state_shardings=state_sh, frozen_shardings=frozen_sh, batch_shardings=data_sh,
                              opt_device_shardings=opt_device_sh)
    eval_step = None
    if eval_batches is not None and cfg.eval_batches:
        eval_step = make_eval_step(loss_fn, mesh=mesh, params_shardings=params_sh, batch_shardings=data_sh)
    return _Setup(state, frozen, step_fn, eval_step, resumed_from, n_trainable, n_total)


class _Bookkeeper:
    """The host side of a run: each step's metrics once they reach the host (history, the logging
    window, throughput and MFU, callbacks, the non-finite policy), evaluations and saves."""

    def __init__(self, result: TrainResult, cfg: TrainConfig, model_cfg: Optional[ModelConfig], mesh: Mesh,
                 logger: MetricsLogger, checkpointer: TrainCheckpointer, batches: Any, eval_batches, eval_step,
                 callbacks: Sequence[Callable[[int, dict], None]], peak_flops: Optional[float], start: int,
                 unit: str = "tokens"):
        self.result, self.cfg, self.mesh, self.logger, self.unit = result, cfg, mesh, logger, unit
        self.checkpointer, self.batches, self.eval_batches, self.eval_step = checkpointer, batches, eval_batches, eval_step
        self.callbacks, self.start = callbacks, start
        # MFU needs the architecture; a loss over a foreign (non-jaxtune) model trains without it.
        self.flops_per_token = model_flops_per_token(model_cfg, cfg.seq_len) if model_cfg is not None else None
        self.peak = (device_peak_flops(jax.devices()[0].device_kind, model_cfg.dtype, peak_flops)
                     if model_cfg is not None else None)
        self.last_eval: dict = {}
        self.last_eval_step = -1
        self.preempting = False
        self._reset_window(compiling=False)

    def _reset_window(self, compiling: bool) -> None:
        self.window = {"t": time.perf_counter(), "tokens": 0.0, "steps": 0, "loss": 0.0, "finite": 0,
                       "compiling": compiling, "extra": {}}

    def finish_call(self, first: int, stacked: bool, metrics: dict) -> None:
        """A call's metrics, fetched from the device once: one step's, or ``[n]``-stacked for n
        steps from ``first`` (train.steps_per_call)."""
        metrics = jax.device_get(metrics)
        if not stacked:
            self.finish_step(first, metrics)
            return
        for i in range(len(metrics["loss"])):
            self.finish_step(first + i, {k: v[i] for k, v in metrics.items()})

    def finish_step(self, step: int, metrics: dict) -> None:
        """Host side of a step whose metrics arrived: history, logging, callbacks, NaN policy."""
        cfg, window = self.cfg, self.window
        metrics = {k: float(v) for k, v in metrics.items()}
        self.result.history.append({"step": step, **metrics})
        if step == self.start + 1:
            # The first step includes compilation: report that once, and keep the window it falls in
            # out of the throughput figures.
            self.result.first_step_s = time.perf_counter() - window["t"]
            self.logger.log(step, {"first_step_s": self.result.first_step_s}, prefix="compile")
            window["compiling"] = True
        window["tokens"] += metrics["tokens"]
        window["steps"] += 1
        if metrics["finite"]:
            window["loss"] += metrics["loss"]
            window["finite"] += 1
            for k in metrics.keys() - STEP_KEYS:  # the loss function's own metrics, e.g. nll, z_loss
                window["extra"][k] = window["extra"].get(k, 0.0) + metrics[k]
        if step % cfg.log_every == 0 or step == cfg.steps or self.preempting:
            self.logger.log(step, self._window_metrics(metrics))
            self._reset_window(compiling=False)
        for callback in self.callbacks:
            callback(step, metrics)
        if metrics["streak"] >= cfg.max_nonfinite_in_row:
            raise NonFiniteLossError(
                f"step {step}: loss or gradients were NaN/inf for {int(metrics['streak'])} steps in a row "
                f"(train.max_nonfinite_in_row={cfg.max_nonfinite_in_row}); those updates were skipped and the "
                f"last checkpoint holds the last finite state. Lower optim.lr, raise warmup or check the data."
            )

    def _window_metrics(self, metrics: dict) -> dict:
        """The logged means of the window that ends at this step (loss over its finite steps)."""
        window, cfg = self.window, self.cfg
        elapsed = time.perf_counter() - window["t"]
        finite = max(window["finite"], 1)
        logged = {"loss": window["loss"] / finite if window["finite"] else float("nan"),
                  "grad_norm": metrics["grad_norm"], "skipped": metrics["skipped"],
                  self.unit: window["tokens"]}  # the window's loss weight (loss tokens: summed into tokens seen by plots)
        if not window["compiling"]:
            logged.update({f"{self.unit}_per_s": window["tokens"] / max(elapsed, 1e-9),
                           "step_time_s": elapsed / max(window["steps"], 1)})
        if "lr" in metrics:
            logged["lr"] = metrics["lr"]
        logged.update({k: v / finite for k, v in window["extra"].items()})
        if self.peak and not window["compiling"]:
            # tokens counts real (loss) tokens; MFU counts every position the model processed.
            positions_per_s = window["steps"] * cfg.batch_size * cfg.seq_len / max(elapsed, 1e-9)
            logged["mfu"] = mfu(positions_per_s / self.mesh.devices.size, self.flops_per_token, self.peak)
        return logged

    def evaluate(self, step: int, state: TrainState, frozen: Any) -> None:
        if self.eval_step is None:
            return
        self.last_eval = evaluate(self.eval_step, join(state.params, frozen), self.eval_batches(), self.mesh,
                                  self.cfg.eval_batches, self.unit)
        self.last_eval_step = step
        if self.last_eval:
            self.result.evals.append({"step": step, **self.last_eval})
            self.logger.log(step, self.last_eval, prefix="eval")

    def save(self, step: int, state: TrainState, force: bool = False) -> None:
        position = data_state(self.batches)
        # keep-best ranks a step only by an evaluation of that very step
        metrics = ({f"eval/{k}": v for k, v in self.last_eval.items()}
                   if self.last_eval and self.last_eval_step == step else None)
        self.checkpointer.save(step, params=state.params, state=_state_extras(state), data_state=position,
                               metrics=metrics, force=force)

    def evaluate_then_save(self, step: int, state: TrainState, frozen: Any, do_eval: bool, force: bool = False):
        """Evaluate (for keep-best) then save; if the evaluation fails, the state is saved first
        (not on KeyboardInterrupt: that is a second Ctrl-C, which means exit now, or a Ctrl-C in a
        multi-process run, where a save by one process alone would wait for the others for ever)."""
        try:
            if do_eval:
                self.evaluate(step, state, frozen)
        except KeyboardInterrupt:
            raise
        except BaseException:
            self.save(step, state, force=True)
            self.checkpointer.wait()
            raise
        self.save(step, state, force=force)


def train(
    *,
    loss_fn: LossFn,
    params: Any,
    model_cfg: Optional[ModelConfig] = None,
    optimizer: optax.GradientTransformation,
    schedule: Optional[optax.Schedule],
    cfg: TrainConfig,
    batches: Iterator[dict],
    mesh: Mesh,
    eval_batches: Optional[Callable[[], Iterable[dict]]] = None,
    checkpointer: Optional[TrainCheckpointer] = None,
    logging: LoggingConfig = LoggingConfig(progress=False, tensorboard=False, jsonl=False),
    log_dir: Optional[str] = None,
    trainable_mask: Any = None,
    rules: Sequence[Rule] = (),
    callbacks: Sequence[Callable[[int, dict], None]] = (),
    on_start: Optional[Callable[[TrainState, Any], None]] = None,
    run_config: Optional[dict] = None,
    weight_unit: str = "tokens",
) -> TrainResult:
    """Run ``cfg.steps`` optimizer steps (resuming from ``checkpointer`` if it holds a state).

    ``params``: a param tree, or a function ``rng -> params`` that is jitted straight onto the
    mesh so large models never sit whole on one device. ``batches``: global batches (dicts of
    host arrays); if it has ``get_state``/``set_state`` its position is checkpointed and restored.
    ``trainable_mask``: bools per array leaf (default: `cfg.trainable` regexes, or everything).
    ``callbacks``: ``fn(step, metrics)`` after each step's metrics reach the host.
    ``on_start``: ``fn(state, frozen)`` once the state is built or restored, before the first step
    and before anything is logged: the caller's last chance to refuse the run (by raising) and the
    moment to record it (run metadata is written there, never for a run that did not start).
    ``run_config``: the job's config as a dict, for the logging sinks that keep it (W&B).
    ``weight_unit``: what the loss's weight counts (tokens, pairs, examples...): the logs' and the
    progress bar's throughput are named by it.
    """
    check_batch_layout(cfg, mesh)
    check_positions(cfg, model_cfg)
    check_steps_per_call(cfg, batches)
    checkpointer = checkpointer or TrainCheckpointer(CheckpointConfig())  # directory None: no-op
    setup = _set_up(loss_fn, params, optimizer, schedule, cfg, batches, mesh, eval_batches, checkpointer,
                    trainable_mask, tuple(rules))
    state, frozen = setup.state, setup.frozen
    if on_start is not None:
        on_start(state, frozen)
    start = int(jax.device_get(state.step))
    result = TrainResult(state=state, frozen=frozen, resumed_from=setup.resumed_from,
                         trainable_params=setup.trainable_params, total_params=setup.total_params)
    logger = MetricsLogger(
        log_dir if (logging.jsonl or logging.tensorboard) else None, total_steps=cfg.steps,
        tensorboard=logging.tensorboard, jsonl=logging.jsonl, progress=logging.progress, start_step=start,
        wandb=logging.wandb, run_config=run_config,
    )
    logger.log(start, {"trainable": setup.trainable_params, "total": setup.total_params}, prefix="params")
    books = _Bookkeeper(result, cfg, model_cfg, mesh, logger, checkpointer, batches, eval_batches, setup.eval_step,
                        callbacks, logging.peak_flops, start, weight_unit)
    local_batches = is_process_local(batches)
    status = "completed"
    stacked = cfg.steps_per_call > 1
    pending: Optional[tuple] = None  # the last call's (first step, stacked, metrics), fetched after the next is queued
    try:
        with StopSignals(saves=getattr(checkpointer, "directory", None) is not None) as preemption:
            step = start
            while step < cfg.steps:
                if hasattr(batches, "set_policy"):  # a rollout stream (GRPO / PPO) samples from the current policy
                    batches.set_policy(state.params, frozen)
                if stacked:
                    n = call_size(step, cfg, checkpointer)
                    batch = place_batch(stack_batches([next(batches) for _ in range(n)]), mesh, local_batches, True)
                else:
                    n, batch = 1, place_batch(next(batches), mesh, local_batches)
                state, metrics = setup.step_fn(state, frozen, batch)
                step += n
                if pending is not None:
                    books.finish_call(*pending)
                pending = (step - n + 1, stacked, metrics)
                if checkpointer.should_save(step):
                    books.finish_call(*pending)  # never save past an unchecked step
                    pending = None
                    books.evaluate_then_save(step, state, frozen, cfg.eval_every and step % cfg.eval_every == 0)
                elif cfg.eval_every and step % cfg.eval_every == 0:
                    books.evaluate(step, state, frozen)
                stop = preemption.reached(step)
                if stop:
                    status, books.preempting = stop, True  # the last step's window is logged too
                    break
            if pending is not None:
                books.finish_call(*pending)
                pending = None
            if step > start or status != "completed":
                books.evaluate_then_save(step, state, frozen, status == "completed" and books.last_eval_step != step,
                                         force=True)
            checkpointer.wait()
    finally:
        logger.close()
        result.state = state
        result.frozen = frozen
    result.status = status
    return result


def _state_extras(state: TrainState) -> dict:
    """Everything in a TrainState but the params (the checkpoint's "state" item)."""
    return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng,
            "skipped": state.skipped, "streak": state.streak}


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
