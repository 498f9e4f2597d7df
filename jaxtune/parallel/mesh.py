"""The device mesh: named axes ``data``, ``fsdp``, ``context``, ``tensor``.

``data`` replicates parameters and splits the batch; ``fsdp`` splits the batch
*and* shards parameters and optimizer state (ZeRO-3 style, gathered per use by
XLA); ``context`` splits the sequence of the activations (context parallelism:
attention gathers the keys / values over it, `jaxtune.models.context_attention`);
``tensor`` shards the head / FFN dimensions of projections (Megatron style).
Sizes come from config; one size may be ``-1`` ("all remaining devices").
This module only builds meshes; which leaf is split along which axis is
`jaxtune.parallel.rules`.

The axes run from outermost to innermost devices: ``tensor`` (a collective per
sublayer) on the closest devices, ``context`` (K/V all-gathers per layer) next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both
CONTEXT_AXIS = "context"  # the sequence dimension of activations is split over it


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    context: int = 1

    def resolve(self, num_devices: int) -> tuple[int, ...]:
        """Axis sizes with ``-1`` filled in, in `AXES` order; errors name the axis and the device count."""
        sizes = {name: getattr(self, name) for name in AXES}
        free = [name for name, s in sizes.items() if s == -1]
        if len(free) > 1:
            raise ValueError(f"mesh: at most one axis may be -1, got {', '.join(free)}")
        for name, s in sizes.items():
            if s == 0 or s < -1:
                raise ValueError(f"mesh.{name}: size must be positive or -1, got {s}")
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if free:
            if num_devices % fixed:
                raise ValueError(
                    f"mesh: {num_devices} devices do not divide by the fixed axes' product {fixed} ({sizes})"
                )
            sizes[free[0]] = num_devices // fixed
        if math.prod(sizes.values()) != num_devices:
            raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, {num_devices} available")
        return tuple(sizes[name] for name in AXES)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh over ``devices`` (default: all devices of all processes) with GSPMD ("auto") axes."""
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.resolve(len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    if len(devices) == len(jax.devices()):
        # make_mesh orders devices for the physical topology (ICI rings on TPU, NVLink on GPU).
        return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def axis_size(mesh: Any, name: str) -> int:
    """The size of axis ``name`` of ``mesh`` (1 where the mesh lacks it: a mesh built by hand)."""
    return int(dict(mesh.shape).get(name, 1))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of any batch array ``[batch, ...]`` (of any rank): batch over data x fsdp, the rest
    replicated -- over ``context`` too: token ids, targets and masks are small, every device of a
    context group slices its part of the sequence locally, and sequence-global work on them (the
    positions within each packed document) needs no exchange between the sequence's blocks."""
    return NamedSharding(mesh, P(BATCH_AXES))
