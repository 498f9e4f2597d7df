"""Runs in a subprocess with 8 fake CPU devices (see test_sharding_equivalence.py).

Trains the same tiny model for a few steps on a single device and on several
meshes, checks where every leaf landed, saves a checkpoint on one mesh and
restores its params on others; writes everything the test asserts as JSON.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jaxtune.checkpoint.manager import CheckpointConfig, TrainCheckpointer, restore_params  # noqa: E402
from jaxtune.data.streams import SyntheticStream  # noqa: E402
from jaxtune.models import Model, ModelConfig  # noqa: E402
from jaxtune.parallel import MeshConfig, make_mesh, param_shardings, param_specs  # noqa: E402
from jaxtune.train.config import TrainConfig  # noqa: E402
from jaxtune.train.losses import causal_lm_loss  # noqa: E402
from jaxtune.train.loop import train  # noqa: E402
from jaxtune.train.optim import OptimConfig, build_optimizer  # noqa: E402

CFG = ModelConfig(
    family="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
    intermediate_size=128, max_position_embeddings=128,
)
MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 8, 1)]
STEPS = 3


def run(mesh_shape, checkpoint_dir=None):
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = make_mesh(MeshConfig(*mesh_shape), devices)
    tc = TrainConfig(steps=STEPS, batch_size=16, seq_len=32, grad_accum=2, log_every=1)
    opt, sched = build_optimizer(OptimConfig(lr=1e-3, warmup_steps=1, weight_decay=0.1), tc.steps)
    model = Model(CFG)
    ckpt = None
    if checkpoint_dir:
        ckpt = TrainCheckpointer(CheckpointConfig(directory=checkpoint_dir, every_steps=STEPS, async_save=False))
    result = train(
        loss_fn=causal_lm_loss(model), params=model.init, model_cfg=CFG, optimizer=opt, schedule=sched, cfg=tc,
        batches=SyntheticStream(16, 32, CFG.vocab_size, seed=1, pad_fraction=0.5), mesh=mesh, checkpointer=ckpt,
    )
    if ckpt:
        ckpt.close()
    declared = param_specs(result.state.params, mesh, warn=False)
    placement = {}
    for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(result.state.params), jax.tree.leaves(declared, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))):
        key = jax.tree_util.keystr(path)
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        placement[key] = {
            "declared": str(spec), "actual": str(leaf.sharding.spec),
            "shape": list(leaf.shape), "shard_shape": list(shard_shape),
            "mu_shard_shape": None,
        }
    adam = result.state.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    for path, leaf in jax.tree_util.tree_leaves_with_path(adam.mu):
        placement[jax.tree_util.keystr(path)]["mu_shard_shape"] = list(leaf.sharding.shard_shape(leaf.shape))
    params = {jax.tree_util.keystr(p): np.asarray(x).tolist() for p, x in jax.tree_util.tree_leaves_with_path(result.state.params)}
    return {"losses": [h["loss"] for h in result.history], "params": params, "placement": placement}


def main(out_path, tmp_dir):
    assert len(jax.devices()) == 8, jax.devices()
    out = {"runs": {}}
    for shape in MESHES:
        ckpt = os.path.join(tmp_dir, "ckpt") if shape == (2, 2, 2) else None
        out["runs"][str(shape)] = run(shape, ckpt)
    # Restore the (2, 2, 2) run's params onto other meshes / device counts.
    restored = {}
    for shape in [(1, 8, 1), (8, 1, 1), (1, 1, 1)]:
        mesh = make_mesh(MeshConfig(*shape), jax.devices()[: int(np.prod(shape))])
        abstract = jax.eval_shape(Model(CFG).init, jax.random.key(0))
        shardings = param_shardings(abstract, mesh, warn=False)
        params, step = restore_params(os.path.join(tmp_dir, "ckpt"), jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings))
        kernel = params["layers_0"]["mlp"]["up_proj"]["kernel"]
        restored[str(shape)] = {
            "step": step,
            "params": {jax.tree_util.keystr(p): np.asarray(x).tolist() for p, x in jax.tree_util.tree_leaves_with_path(params)},
            "up_proj_spec": str(kernel.sharding.spec),
            "up_proj_devices": len(kernel.sharding.device_set),
        }
    out["restored"] = restored
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
