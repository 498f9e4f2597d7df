"""Training checkpoints: save (async), keep the last N and the best N, resume the exact state.

A training checkpoint directory::

    model_config.json        the run's metadata (`jaxtune.job.runmeta`: the ModelConfig and, in
    train_meta.json          train_meta.json, the job, its base model, PEFT and heads); not this module's
    <step>/params/           Orbax PyTree checkpoint of the param tree
    <step>/state/            Orbax PyTree checkpoint of everything else that resumes training exactly:
                             optimizer state, step counter, RNG key data, counters
    <step>/data/             JSON: the data iterator's position
    <step>/checksums/        JSON: an exact checksum of every saved array (`jaxtune.utils.fingerprint`),
                             verified at restore: a step whose arrays changed on disk is corrupt
    <step>/metrics/          JSON: the metrics given at save time (only when keep_best > 0)

`TrainCheckpointer` is what the training loop holds: ``should_save`` / ``save`` / ``restore``
/ ``wait``. `restore_params` reads the params of one step alone, onto any mesh, for evaluation
or serving. Both know only pytrees: the caller gives the abstract tree to restore into.

What this module must not do: decide *when* to save (the loop asks ``should_save`` and forces
the last and the preemption save), checkpoint a state holding NaN/inf (``save`` refuses it),
or silently resume from a broken step (``restore`` warns, naming the step and the reason,
before it falls back to the one before). Broken means unreadable, changed since it was saved (a
checksum differs) or holding NaN / inf (``save`` never writes those).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from jaxtune.utils.fingerprint import leaf_checksums, mismatches
from jaxtune.utils.moved import moved_names
from jaxtune.utils.tree import keypath_str


class _ReadOnlyNotice(logging.Filter):
    """Drops Orbax's "Given directory is read only" warning: every restore opens the run read-only on
    purpose (so that reading never writes), and the notice would print on every `eval` / `generate`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_ReadOnlyNotice())

PARAMS_ITEM, STATE_ITEM, DATA_ITEM, CHECKSUMS_ITEM = "params", "state", "data", "checksums"
__getattr__ = moved_names(__name__, {"TRAIN_META_FILE": "jaxtune.job.runmeta.TRAIN_META_FILE"})


@dataclass(frozen=True)
class CheckpointConfig:
    """The ``checkpoint`` section of a training config."""

    directory: Optional[str] = None  # None = no checkpoints
    every_steps: int = 1000  # save when step % every_steps == 0 (the loop forces the last step)
    keep_last: int = 3  # keep the N most recent
    keep_best: int = 0  # additionally keep the N best by best_metric (0 = off)
    best_metric: str = "eval/loss"
    best_mode: Literal["min", "max"] = "min"
    async_save: bool = True

    def __post_init__(self):
        if self.every_steps < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1, got {self.every_steps}")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        if self.keep_best < 0:
            raise ValueError(f"checkpoint.keep_best must be >= 0, got {self.keep_best}")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"checkpoint.best_mode must be 'min' or 'max', got {self.best_mode!r}")


class NonFiniteStateError(FloatingPointError):
    """A params or state leaf holds NaN or inf; such a state is never checkpointed."""


class TrainCheckpointer:
    """Orbax `CheckpointManager` over steps of (params, state, data position).

    With ``cfg.directory=None`` every method is a no-op (``restore`` returns None), so the
    loop calls it unconditionally.
    """

    def __init__(self, cfg: CheckpointConfig, *metadata):
        if metadata:
            raise TypeError("TrainCheckpointer(cfg) takes the checkpoint config only: the ModelConfig and run "
                            "metadata beside the steps are written by jaxtune.job.runmeta.start_run(directory, "
                            "model_cfg, meta) (run_training does it)")
        self.cfg = cfg
        self._manager: Optional[ocp.CheckpointManager] = None
        self._closed = False
        self._invalid_steps: set[int] = set()  # steps restore() found broken; a new save may replace them
        self.directory: Optional[epath.Path] = None if cfg.directory is None else _absolute(cfg.directory)
        if self.directory is None:
            return
        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
        policies: list = [checkpoint_managers.LatestN(n=cfg.keep_last)]
        best_fn = None
        if cfg.keep_best:
            best_fn = _metric_score(cfg.best_metric, cfg.best_mode)
            # BestN sorts ascending by score and keeps the tail: reverse=True keeps the smallest.
            policies.append(checkpoint_managers.BestN(
                get_metric_fn=best_fn, reverse=cfg.best_mode == "min", n=cfg.keep_best,
                keep_checkpoints_without_metrics=False,
            ))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=cfg.async_save,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            # best_fn only makes Orbax write each step's metrics to disk, so the best steps are
            # still known after a restart; which steps survive is decided by the policy above.
            best_fn=best_fn,
            best_mode=cfg.best_mode,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def should_save(self, step: int) -> bool:
        """True every ``every_steps`` steps (never at step 0) when checkpointing is on."""
        return self._manager is not None and step > 0 and step % self.cfg.every_steps == 0

    def save(self, step: int, *, params: Any, state: Any, data_state: dict,
             metrics: Optional[dict] = None, force: bool = False) -> bool:
        """Start saving ``step``; returns whether a save started.

        ``force`` skips the ``every_steps`` rule (last step, preemption). A step already on
        disk is not saved again (returns False), unless ``restore`` found it broken.
        Raises `NonFiniteStateError` before anything is written if a float leaf is NaN/inf.
        """
        if self._closed:
            raise RuntimeError(f"TrainCheckpointer for {self.directory} is closed; cannot save step {step}")
        if self._manager is None:
            return False
        step = int(step)
        if not force and not self.should_save(step):
            return False
        if step in self._manager.all_steps():
            if step not in self._invalid_steps:
                return False
            warnings.warn(f"checkpoint step {step} in {self.directory} is broken; replacing it", stacklevel=2)
            self._manager.delete(step)
            self._invalid_steps.discard(step)
        bad = _non_finite_leaves({PARAMS_ITEM: params, STATE_ITEM: state})
        if bad:
            more = f" (and {len(bad) - 1} more leaves)" if len(bad) > 1 else ""
            raise NonFiniteStateError(f"refusing to checkpoint step {step}: {bad[0]} holds NaN or inf{more}")
        try:
            json.dumps(data_state)
        except (TypeError, ValueError) as err:
            raise TypeError(f"checkpoint step {step}: data_state must be JSON-serialisable ({err})") from err
        if metrics is not None and self.cfg.keep_best:
            metrics = {str(k): float(v) for k, v in metrics.items()}
        else:
            metrics = None  # Orbax stores metrics only to rank steps for keep_best
        args = ocp.args.Composite(**{
            PARAMS_ITEM: ocp.args.StandardSave(params),
            STATE_ITEM: ocp.args.StandardSave(state),
            DATA_ITEM: ocp.args.JsonSave(data_state),
            CHECKSUMS_ITEM: ocp.args.JsonSave(leaf_checksums({PARAMS_ITEM: params, STATE_ITEM: state})),
        })
        return bool(self._manager.save(step, args=args, metrics=metrics, force=True))

    def latest_step(self) -> Optional[int]:
        """The newest step on disk (committed, not necessarily readable: `restore` checks that)."""
        return None if self._manager is None else self._manager.latest_step()

    def restore(self, abstract_params: Any, abstract_state: Any) -> Optional[tuple[int, Any, Any, dict]]:
        """-> (step, params, state, data_state) of the newest readable step, or None if there is none.

        ``abstract_*`` are pytrees of `jax.ShapeDtypeStruct` with ``.sharding`` set; leaves are
        restored onto those shardings. A step that fails to restore is reported with
        `warnings.warn` and the previous one is tried; if every step fails, raises RuntimeError.
        """
        if self._manager is None:
            return None
        self.wait()
        args = ocp.args.Composite(**{
            PARAMS_ITEM: ocp.args.StandardRestore(abstract_params),
            STATE_ITEM: ocp.args.StandardRestore(abstract_state),
            DATA_ITEM: ocp.args.JsonRestore(),
        })
        found = _restore_newest_readable(self._manager, self.directory, args, self._invalid_steps)
        if found is None:
            return None
        step, restored = found
        return step, restored[PARAMS_ITEM], restored[STATE_ITEM], restored[DATA_ITEM]

    def wait(self) -> None:
        """Block until every started save is committed (raises what a background save raised)."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves, then release Orbax's threads. Idempotent."""
        if self._manager is not None:
            self._manager.close()
            self._manager = None
        self._closed = True

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def restore_params(directory: str | os.PathLike, abstract: Any, *, step: Optional[int] = None,
                   base_params: Any = None) -> tuple[Any, int]:
    """-> (params, step) from a training checkpoint directory, onto any mesh or device count.

    ``abstract``: the param tree the run trained, as `jax.ShapeDtypeStruct` leaves (a changed dtype
    casts on restore); leaves with a ``.sharding`` are restored onto it, the others onto the first
    local device. A run that froze part of its tree checkpointed only the trainable half:
    ``base_params`` (the same tree structure) gives the frozen leaves.

    ``step=None`` takes the newest readable step (broken ones are warned about and skipped).
    """
    directory = _absolute(directory)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)
                                                           or device), abstract)
    args = ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(abstract)})
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    with ocp.CheckpointManager(directory, options=options) as manager:
        if step is not None:
            if step not in manager.all_steps():
                steps = sorted(manager.all_steps())
                raise FileNotFoundError(f"{directory}: no checkpoint step {step} (steps: {steps})")
            restored = manager.restore(step, args=args)
            _verify(manager, directory, step, restored)
            return _fill_frozen(restored[PARAMS_ITEM], base_params, directory), step
        found = _restore_newest_readable(manager, directory, args, set())
    if found is None:
        raise FileNotFoundError(f"{directory}: no checkpoint steps")
    step, restored = found
    return _fill_frozen(restored[PARAMS_ITEM], base_params, directory), step


def _fill_frozen(params: Any, base_params: Any, directory) -> Any:
    """A run with frozen params checkpoints only the trainable half (None elsewhere): take the
    frozen leaves from ``base_params`` (the run's base model), or say what is missing."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)
    holes = [keypath_str(p) for p, x in leaves if x is None]
    if not holes:
        return params
    if base_params is None:
        raise ValueError(f"{directory} holds only the trainable params of its run ({len(holes)} frozen leaves such as "
                         f"{holes[0]} are not in it); restore with base_params= the run's base model "
                         "(model.checkpoint does this from the run's train_meta.json)")
    base = jax.tree.leaves(base_params)
    if len(base) != len(leaves):
        raise ValueError(f"{directory}: base_params has {len(base)} leaves, the checkpoint's tree {len(leaves)}")
    return jax.tree.unflatten(treedef, [b if x is None else x for (_, x), b in zip(leaves, base)])


def _restore_newest_readable(manager: ocp.CheckpointManager, directory, args, invalid: set[int]):
    """-> (step, restored Composite) of the newest step that restores, or None if there are no steps."""
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    failures = []
    for step in steps:
        try:
            restored = manager.restore(step, args=args)
            _verify(manager, directory, step, restored)
            return step, restored
        except Exception as err:  # orbax/tensorstore raise ValueError, KeyError, OSError, JSONDecodeError...
            reason = f"{type(err).__name__}: {_first_line(err)}"
            failures.append((step, reason, err))
            invalid.add(step)
            if step != steps[-1]:
                warnings.warn(f"checkpoint step {step} in {directory} cannot be restored ({reason}); "
                              "falling back to the previous step", stacklevel=3)
    listing = "; ".join(f"step {s}: {r}" for s, r, _ in failures)
    raise RuntimeError(f"no checkpoint in {directory} can be restored ({listing})") from failures[-1][2]


class CorruptCheckpointError(ValueError):
    """A step's arrays differ from what was saved (checksums) or hold NaN / inf."""


def _verify(manager: ocp.CheckpointManager, directory, step: int, restored) -> None:
    """Raise `CorruptCheckpointError` naming the file and leaf when the restored arrays are not the
    saved ones: their checksums (recorded at save; steps saved before checksums existed are only
    checked for finiteness) or a NaN / inf, which `save` never writes."""
    trees = {k: restored[k] for k in (PARAMS_ITEM, STATE_ITEM) if k in restored}
    where = f"{directory}/{step}"
    if (epath.Path(str(directory)) / str(step) / CHECKSUMS_ITEM).exists():
        recorded = manager.restore(step, args=ocp.args.Composite(**{CHECKSUMS_ITEM: ocp.args.JsonRestore()}))
        recorded = {k: v for k, v in recorded[CHECKSUMS_ITEM].items() if k.split("/", 1)[0] in trees}
        bad = mismatches(recorded, leaf_checksums(trees))
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise CorruptCheckpointError(f"{where}/{bad[0].split('/', 1)[0]}: array {bad[0]} differs from what was "
                                         f"saved (checksum mismatch){more}")
    bad = _non_finite_leaves(trees)
    if bad:
        raise CorruptCheckpointError(f"{where}/{bad[0].split('/', 1)[0]}: array {bad[0]} holds NaN or inf, which "
                                     "is never saved")


def _non_finite_leaves(tree: Any) -> list[str]:
    """Paths ('state/opt/0/mu/w') of float leaves holding NaN or inf, in tree order."""
    leaves = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0] if _is_float(x)]
    if not leaves:
        return []
    finite = jax.device_get(_all_finite([x for _, x in leaves]))
    return [keypath_str(path) for (path, _), ok in zip(leaves, finite) if not ok]


@jax.jit
def _all_finite(xs: list) -> jax.Array:
    """[n_leaves] bool: every element of leaf i is finite."""
    return jnp.stack([jnp.isfinite(x).all() for x in xs])


def _is_float(x: Any) -> bool:
    if isinstance(x, float):
        return True
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _metric_score(name: str, mode: str):
    """Score of a step's metrics for BestN; a missing or non-finite metric ranks worst."""
    worst = math.inf if mode == "min" else -math.inf

    def score(metrics: dict) -> float:
        value = metrics.get(name) if isinstance(metrics, dict) else None
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else worst

    return score


def _absolute(directory: str | os.PathLike) -> epath.Path:
    text = os.fspath(directory)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0][:300] if text else "") or repr(err)
