"""Training checkpoints: exact round trip, keep-last/keep-best, broken-step fallback, NaN refusal, params alone."""

import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtune.checkpoint import CheckpointConfig, NonFiniteStateError, TrainCheckpointer
from jaxtune.checkpoint.manager import restore_params
from jaxtune.config.loader import ConfigError, from_dict, to_dict
from jaxtune.models import Model
from jaxtune.models.presets import preset

# A restore that fails leaves tensorstore reads and Orbax coroutines in flight; when they end after
# Orbax closed its event loop, Python reports "Event loop is closed" / "never awaited" (noise only).
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning"),
]

CFG = preset("tiny-llama")
DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def small_params(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"dense": {"w": jax.random.normal(k1, (4, 3)), "b": jax.random.normal(k2, (3,)).astype(jnp.bfloat16)}}


def train_state(params, step=7):
    """An optimizer state a few updates in, a step scalar, RNG key data and a counter."""
    opt = optax.adamw(1e-2)
    opt_state = opt.init(params)
    for _ in range(2):
        grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
        updates, opt_state = opt.update(grads, opt_state, params)
    return {
        "opt": opt_state,
        "step": jnp.asarray(step, jnp.int32),
        "rng": jax.random.key_data(jax.random.key(step)),
        "tokens_seen": jnp.asarray(123456, jnp.int32),
    }


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=DEVICE), tree)


def checkpointer(tmp_path, **kw):
    kw.setdefault("async_save", False)
    return TrainCheckpointer(CheckpointConfig(directory=str(tmp_path / "run"), **kw))


def save_step(ckpt, step, seed=None, **kw):
    params = small_params(step if seed is None else seed)
    state = train_state(params, step)
    return ckpt.save(step, params=params, state=state, data_state={"position": step}, force=True, **kw)


def steps_on_disk(tmp_path):
    return sorted(int(p.name) for p in (tmp_path / "run").iterdir() if p.name.isdigit())


def assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_round_trip_is_exact(tmp_path):
    params = small_params()
    state = train_state(params)
    data = {"shard": 3, "offset": 1234, "files": ["a.jsonl", "b.jsonl"]}
    ckpt = TrainCheckpointer(CheckpointConfig(directory=str(tmp_path / "run"), async_save=False))
    assert ckpt.save(7, params=params, state=state, data_state=data, force=True)
    ckpt.close()

    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["7"]  # pytrees only: metadata is the job's
    with checkpointer(tmp_path) as resumed:  # a new process resuming
        assert resumed.latest_step() == 7
        step, got_params, got_state, got_data = resumed.restore(abstract(params), abstract(state))
    assert step == 7 and got_data == data
    assert_trees_equal(got_params, params)
    assert_trees_equal(got_state, state)
    assert got_state["rng"].dtype == jnp.uint32
    assert isinstance(got_state["opt"][0], optax.ScaleByAdamState)
    assert all(leaf.sharding == DEVICE for leaf in jax.tree.leaves((got_params, got_state)))


def test_nothing_to_restore_and_disabled(tmp_path):
    params = small_params()
    with checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.restore(abstract(params), abstract(train_state(params))) is None
    off = TrainCheckpointer(CheckpointConfig(directory=None))
    assert not off.should_save(1000) and not save_step(off, 1000) and off.restore(None, None) is None
    off.close()


def test_should_save_and_repeated_step(tmp_path):
    with checkpointer(tmp_path, every_steps=10) as ckpt:
        assert [s for s in range(31) if ckpt.should_save(s)] == [10, 20, 30]
        params = small_params()
        assert not ckpt.save(5, params=params, state=train_state(params), data_state={})  # not due
        assert ckpt.save(10, params=params, state=train_state(params), data_state={})
        assert not save_step(ckpt, 10)  # the final forced save after a regular one at the same step
    assert steps_on_disk(tmp_path) == [10]


def test_keep_last(tmp_path):
    with checkpointer(tmp_path, keep_last=2) as ckpt:
        for step in range(1, 6):
            assert save_step(ckpt, step)
    assert steps_on_disk(tmp_path) == [4, 5]


@pytest.mark.parametrize("mode,losses,best", [("min", [3.0, 1.0, 2.0, 5.0], 2), ("max", [3.0, 1.0, 6.0, 5.0], 3)])
def test_keep_best_and_newest(tmp_path, mode, losses, best):
    with checkpointer(tmp_path, keep_last=1, keep_best=1, best_mode=mode, best_metric="eval/loss") as ckpt:
        for step, loss in enumerate(losses, start=1):
            save_step(ckpt, step, metrics={"eval/loss": loss, "train/loss": 0.0})
    assert steps_on_disk(tmp_path) == sorted({best, 4})
    # A restarted run still knows which step is best (metrics are on disk), and a step saved
    # without metrics or with a NaN metric is kept only while it is the newest.
    with checkpointer(tmp_path, keep_last=1, keep_best=1, best_mode=mode) as ckpt:
        save_step(ckpt, 5)
        save_step(ckpt, 6, metrics={"eval/loss": float("nan")})
        assert steps_on_disk(tmp_path) == [best, 6]
        save_step(ckpt, 7)
    assert steps_on_disk(tmp_path) == [best, 7]


def break_array_files(step_dir):
    """Delete the params' array chunks (OCDBT data files under params/d/)."""
    files = list((step_dir / "params" / "d").iterdir())
    assert files
    for f in files:
        f.unlink()


def truncate_array_files(step_dir):
    for f in (step_dir / "params" / "d").iterdir():
        f.write_bytes(f.read_bytes()[:10])


def half_written(step_dir):
    """A step directory with params written but state and data missing."""
    shutil.rmtree(step_dir / "state")
    shutil.rmtree(step_dir / "data")


@pytest.mark.parametrize("damage", [break_array_files, truncate_array_files, half_written])
def test_broken_latest_falls_back_to_previous(tmp_path, damage):
    with checkpointer(tmp_path) as ckpt:
        save_step(ckpt, 1)
        save_step(ckpt, 2)
    damage(tmp_path / "run" / "2")
    # An uncommitted temporary directory (a save killed mid-write) is not a step at all.
    (tmp_path / "run" / "3.orbax-checkpoint-tmp-1234567" / "params").mkdir(parents=True)

    params = small_params()
    state = train_state(params)
    with checkpointer(tmp_path) as ckpt:
        with pytest.warns(UserWarning, match=r"checkpoint step 2 .* cannot be restored \(\w+"):
            step, got_params, got_state, data = ckpt.restore(abstract(params), abstract(state))
        assert step == 1 and data == {"position": 1}
        assert_trees_equal(got_params, small_params(1))
        assert_trees_equal(got_state, train_state(small_params(1), 1))
        # Training resumes from step 1 and reaches step 2 again: the broken step is replaced.
        with pytest.warns(UserWarning, match="step 2 .* is broken; replacing it"):
            assert save_step(ckpt, 2, seed=22)
    with checkpointer(tmp_path) as ckpt, warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckpt.restore(abstract(params), abstract(state))[0] == 2


def test_restore_params_falls_back_and_all_broken_raises(tmp_path):
    model = Model(CFG)
    shape = jax.eval_shape(model.init, jax.random.key(0))
    saved = {}
    with checkpointer(tmp_path) as ckpt:
        for step in (1, 2):
            saved[step] = model.init(jax.random.key(step))
            ckpt.save(step, params=saved[step], state={"step": jnp.asarray(step)}, data_state={}, force=True)
    break_array_files(tmp_path / "run" / "2")
    with pytest.warns(UserWarning, match="checkpoint step 2"):
        params, step = restore_params(tmp_path / "run", shape)
    assert step == 1
    assert_trees_equal(params, saved[1])
    with pytest.raises(ValueError, match="params/d/"):
        restore_params(tmp_path / "run", shape, step=2)  # an explicit step does not fall back

    break_array_files(tmp_path / "run" / "1")
    all_broken = r"no checkpoint .* can be restored \(step 2: ValueError: .*; step 1: ValueError"
    with pytest.warns(UserWarning, match="checkpoint step 2"), pytest.raises(RuntimeError, match=all_broken):
        restore_params(tmp_path / "run", shape)


def test_non_finite_state_is_refused(tmp_path):
    params = small_params()
    state = train_state(params)
    with checkpointer(tmp_path) as ckpt:
        assert save_step(ckpt, 1)
        bad_state = jax.tree_util.tree_map_with_path(
            lambda p, x: x.at[0, 0].set(jnp.nan) if "mu" in jax.tree_util.keystr(p) and x.ndim == 2 else x, state)
        with pytest.raises(NonFiniteStateError, match=r"step 2: state/opt/0/mu/dense/w holds NaN or inf"):
            ckpt.save(2, params=params, state=bad_state, data_state={}, force=True)
        bad_params = {"dense": {**params["dense"], "b": params["dense"]["b"].at[1].set(jnp.inf)}}
        with pytest.raises(NonFiniteStateError, match=r"params/dense/b"):
            ckpt.save(2, params=bad_params, state=state, data_state={}, force=True)
        assert ckpt.latest_step() == 1
    assert steps_on_disk(tmp_path) == [1]
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith("2")]


def test_restore_params_onto_given_sharding_and_dtype(tmp_path):
    cfg = CFG.replace(num_layers=2)
    params = Model(cfg).init(jax.random.key(1))
    ckpt = TrainCheckpointer(CheckpointConfig(directory=str(tmp_path / "run"), async_save=False))
    ckpt.save(3, params=params, state={"step": jnp.asarray(3)}, data_state={}, force=True)
    ckpt.close()

    device = jax.sharding.SingleDeviceSharding(jax.devices()[-1])
    shape = jax.eval_shape(Model(cfg).init, jax.random.key(0))
    got, step = restore_params(str(tmp_path / "run"), jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), shape))
    assert step == 3
    assert_trees_equal(got, params)
    assert all(leaf.sharding == device for leaf in jax.tree.leaves(got))

    bf16, _ = restore_params(tmp_path / "run", jax.eval_shape(Model(cfg.replace(param_dtype="bfloat16")).init,
                                                              jax.random.key(0)), step=3)
    assert {leaf.dtype for leaf in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(np.asarray(bf16["embed"]["embedding"]),
                                  np.asarray(params["embed"]["embedding"].astype(jnp.bfloat16)))


def test_async_save_is_committed_after_wait(tmp_path):
    ckpt = checkpointer(tmp_path, async_save=True)
    params = small_params()
    state = train_state(params)
    assert ckpt.save(5, params=params, state=state, data_state={"position": 5}, force=True)
    ckpt.wait()
    run = tmp_path / "run"
    assert steps_on_disk(tmp_path) == [5]
    assert not [p for p in run.iterdir() if "tmp" in p.name]
    assert {p.name for p in (run / "5").iterdir()} >= {"params", "state", "data"}
    with checkpointer(tmp_path) as other:  # visible to a fresh reader while the writer is still open
        assert other.restore(abstract(params), abstract(state))[0] == 5
    ckpt.close()


def test_a_closed_checkpointer_refuses_to_save():
    closed = TrainCheckpointer(CheckpointConfig(directory=None))
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        save_step(closed, 1)


def test_config_is_plain_data():
    cfg = from_dict(CheckpointConfig, {"directory": "/ckpt", "every_steps": 500, "keep_best": 2, "best_mode": "max"})
    assert cfg == CheckpointConfig(directory="/ckpt", every_steps=500, keep_best=2, best_mode="max")
    assert from_dict(CheckpointConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="best_mode"):
        from_dict(CheckpointConfig, {"best_mode": "lowest"})
    with pytest.raises(ConfigError, match="every_steps must be >= 1"):
        from_dict(CheckpointConfig, {"every_steps": 0})
