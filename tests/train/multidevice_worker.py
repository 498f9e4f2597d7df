"""Runs in a subprocess with 8 fake CPU devices (see test_sharding_equivalence.py).

Trains the same tiny model for a few steps on a single device and on several
meshes, checks where every leaf landed, saves a checkpoint on one mesh and
restores its params on others; computes one loss and its gradients under
context parallelism (causal with padding, packed documents, a sliding window,
a prefix) on several meshes and records the step's collectives; writes
everything the test asserts as JSON.
"""

import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jaxtune.checkpoint.manager import CheckpointConfig, TrainCheckpointer, restore_params  # noqa: E402
from jaxtune.data.streams import SyntheticStream  # noqa: E402
from jaxtune.models import Model, ModelConfig  # noqa: E402
from jaxtune.parallel import MeshConfig, activation_mesh, batch_sharding, make_mesh, param_shardings, param_specs  # noqa: E402
from jaxtune.train.config import TrainConfig  # noqa: E402
from jaxtune.train.losses import causal_lm_loss  # noqa: E402
from jaxtune.train.loop import train  # noqa: E402
from jaxtune.train.optim import OptimConfig, build_optimizer  # noqa: E402

CFG = ModelConfig(
    family="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
    intermediate_size=128, max_position_embeddings=128,
)
# Meshes by their axis sizes (the others 1). Each axis is trained on, with the others: data=2
# fsdp=2 tensor=2 trains every param-sharding axis at once (a pure fsdp mesh would compile another
# step for the same check), data=2 context=4 also stands for pure data parallelism (its params are
# replicated); the params are restored onto pure fsdp and pure data meshes below.
MESHES = ["data=1", "data=2 fsdp=2 tensor=2", "data=2 context=4"]
CHECKPOINTED = "data=2 fsdp=2 tensor=2"
RESTORED_ON = ["fsdp=8", "data=8", "data=1"]
STEPS = 3


def mesh_of(name: str):
    sizes = {k: int(v) for k, v in (item.split("=") for item in name.split())}
    cfg = MeshConfig(**{"data": 1, **sizes})
    return make_mesh(cfg, jax.devices()[: int(np.prod(list(sizes.values())))])


def run(mesh_name, checkpoint_dir=None):
    mesh = mesh_of(mesh_name)
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


# Context parallelism: one loss and its gradients. Layer 0 slides (window 8), layer 1 attends to
# the whole causal past; key tiles of 8 so that tiles are skipped by global slot indices.
CONTEXT_CFG = CFG.replace(sliding_window=8, layer_types=("sliding", "full"), attention_impl="blockwise",
                          attention_block_kv=8)
CONTEXT_CASES = {  # variant -> meshes; each variant also runs on one device
    "plain": ["fsdp=2 context=4", "context=8"],
    "prefix": ["tensor=2 context=4"],  # prefix-tuning columns; heads split over tensor
}


def context_batch():
    """Four rows of 32: one document then padding; three packed documents then padding; left
    padding; two packed documents (segment ids 0 = padding)."""
    seg = np.zeros((4, 32), np.int32)
    seg[0, :20] = 1
    seg[1, :7], seg[1, 7:18], seg[1, 18:30] = 1, 2, 3
    seg[2, 5:] = 1
    seg[3, :16], seg[3, 16:] = 1, 2
    tokens = np.random.default_rng(0).integers(1, CFG.vocab_size, (4, 32)).astype(np.int32) * (seg != 0)
    targets = np.concatenate([tokens[:, 1:], np.zeros((4, 1), np.int32)], axis=1)
    loss_mask = ((seg != 0) & (np.concatenate([seg[:, 1:], np.zeros((4, 1), np.int32)], axis=1) == seg))
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask.astype(np.float32), "segment_ids": seg}


def context_params(variant):
    cfg = CONTEXT_CFG
    model = Model(cfg)
    params = model.init(jax.random.key(0))
    if variant == "prefix":
        keys = jax.random.split(jax.random.key(1), 2)
        shape = (cfg.num_layers, 3, cfg.num_kv_heads, cfg.head_dim)
        params["prefix"] = {"keys": jax.random.normal(keys[0], shape), "values": jax.random.normal(keys[1], shape)}
    return model, params


def collectives(hlo: str) -> list[list[str]]:
    """[kind, shape, op_name] of every collective in the compiled program."""
    found = []
    for line in hlo.splitlines():
        m = re.search(r"= (\S+) (all-gather|reduce-scatter|all-reduce|collective-permute|all-to-all)(-start)?\(", line)
        if m:
            op = re.search(r'op_name="(.*?)"', line)
            found.append([m.group(2), m.group(1), op.group(1) if op else ""])
    return found


def context_run(variant, mesh_name):
    model, params = context_params(variant)
    loss_fn = causal_lm_loss(model)
    batch = context_batch()
    mesh = mesh_of(mesh_name)

    def loss_and_grads(params, batch):
        def mean_loss(p):
            total, weight, _ = loss_fn(p, batch, None)
            return total / weight

        with activation_mesh(mesh):
            return jax.value_and_grad(mean_loss)(params)

    step = jax.jit(loss_and_grads, in_shardings=(param_shardings(params, mesh, warn=False), batch_sharding(mesh)))
    compiled = step.lower(params, batch).compile()
    loss, grads = compiled(params, batch)
    return {"loss": float(loss), "collectives": collectives(compiled.as_text()),
            "grads": {jax.tree_util.keystr(p): np.asarray(g).tolist() for p, g in jax.tree_util.tree_leaves_with_path(grads)}}


def context_error():
    """The message when the sequence does not split over mesh.context (the whole model, traced)."""
    model, params = context_params("plain")
    batch = {k: v[:, :30] for k, v in context_batch().items()}
    try:
        with activation_mesh(mesh_of("context=4")):
            jax.eval_shape(lambda p: causal_lm_loss(model)(p, batch, None), params)
    except ValueError as err:
        return str(err)
    return None


def main(out_path, tmp_dir):
    assert len(jax.devices()) == 8, jax.devices()
    out = {"runs": {}}
    for name in MESHES:
        ckpt = os.path.join(tmp_dir, "ckpt") if name == CHECKPOINTED else None
        out["runs"][name] = run(name, ckpt)
    # Restore the checkpointed run's params onto other meshes / device counts.
    restored = {}
    for name in RESTORED_ON:
        mesh = mesh_of(name)
        abstract = jax.eval_shape(Model(CFG).init, jax.random.key(0))
        shardings = param_shardings(abstract, mesh, warn=False)
        params, step = restore_params(os.path.join(tmp_dir, "ckpt"), jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings))
        kernel = params["layers_0"]["mlp"]["up_proj"]["kernel"]
        restored[name] = {
            "step": step,
            "params": {jax.tree_util.keystr(p): np.asarray(x).tolist() for p, x in jax.tree_util.tree_leaves_with_path(params)},
            "up_proj_spec": str(kernel.sharding.spec),
            "up_proj_devices": len(kernel.sharding.device_set),
        }
    out["restored"] = restored
    out["context"] = {variant: {name: context_run(variant, name) for name in ["data=1"] + meshes}
                      for variant, meshes in CONTEXT_CASES.items()}
    out["context_error"] = context_error()
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
