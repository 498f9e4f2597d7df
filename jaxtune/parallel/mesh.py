"""The device mesh: named axes ``data``, ``fsdp``, ``tensor``.

``data`` replicates parameters and splits the batch; ``fsdp`` splits the batch
*and* shards parameters and optimizer state (ZeRO-3 style, gathered per use by
XLA); ``tensor`` shards the head / FFN dimensions of projections (Megatron
style). Sizes come from config; one size may be ``-1`` ("all remaining
devices"). This module only builds meshes; which leaf is split along which
axis is `jaxtune.parallel.rules`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Axis sizes with ``-1`` filled in; errors name the axis and the device count."""
        sizes = [self.data, self.fsdp, self.tensor]
        free = [name for name, s in zip(AXES, sizes) if s == -1]
        if len(free) > 1:
            raise ValueError(f"mesh: at most one axis may be -1, got {', '.join(free)}")
        for name, s in zip(AXES, sizes):
            if s == 0 or s < -1:
                raise ValueError(f"mesh.{name}: size must be positive or -1, got {s}")
        fixed = math.prod(s for s in sizes if s != -1)
        if free:
            if num_devices % fixed:
                raise ValueError(
                    f"mesh: {num_devices} devices do not divide by the fixed axes' product {fixed} "
                    f"({dict(zip(AXES, sizes))})"
                )
            sizes = [num_devices // fixed if s == -1 else s for s in sizes]
        if math.prod(sizes) != num_devices:
            raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, {num_devices} available")
        return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh over ``devices`` (default: all devices of all processes) with GSPMD ("auto") axes."""
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.resolve(len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    if len(devices) == len(jax.devices()):
        # make_mesh orders devices for the physical topology (ICI rings on TPU, NVLink on GPU).
        return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of any batch array ``[batch, ...]`` (of any rank): batch over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))
