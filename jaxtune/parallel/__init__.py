"""Device meshes, sharding rules from param paths, activation constraints."""

from jaxtune.parallel.mesh import MeshConfig, batch_sharding, make_mesh
from jaxtune.parallel.rules import (
    activation_mesh,
    constrain,
    param_shardings,
    param_specs,
    register_sharding,
)

__all__ = [
    "MeshConfig", "make_mesh", "batch_sharding", "param_specs", "param_shardings",
    "register_sharding", "activation_mesh", "constrain",
]
