"""Objectives as plug-ins: one module per objective, registered by ``objective.kind``.

    from jaxtune.job.objectives import get_objective
    objective = get_objective(job.objective.kind)     # loss, streams, head, reference, eval metrics

`base` holds the protocol (`Objective`, `Context`) and the registry; importing this package
registers every shipped objective.
"""

from jaxtune.job.objectives import (  # noqa: F401  (each module registers its objective)
    causal,
    classification,
    dpo,
    grpo,
    masked,
    nsp,
    ppo,
    reward,
    sft,
)
from jaxtune.job.objectives.base import Context, Network, Objective, get_objective, register, registered

__all__ = ["Context", "Network", "Objective", "get_objective", "register", "registered"]
