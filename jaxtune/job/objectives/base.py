"""What an objective is to a job: the protocol every objective module implements, and the registry.

An objective says which data it trains on (``data_kinds``), how it changes the model's config
(`model_config`: masked LM attends both ways), which head it adds (`head`), where its reference
policy comes from (`reference`), its loss (`loss`, the one loop's loss contract), its batch
streams (`streams`: training stream and held-out factory) and, where it has them, metrics of a
restored model beyond the held-out loss (`eval_metrics`). `Context` carries what they are built
from. `register` / `get_objective` are the registry by ``objective.kind``; nothing else in jaxtune
tests an objective's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp

from jaxtune.job.schema import OBJECTIVES, TrainJobConfig
from jaxtune.job.streams import Streams
from jaxtune.models import ModelConfig
from jaxtune.models.heads import HeadSpec
from jaxtune.train.losses import LossFn


@dataclass(frozen=True)
class Network:
    """A second model the job trains beside the policy (PPO's separate value network)."""

    params: Any
    cfg: ModelConfig


@dataclass(frozen=True)
class Context:
    """What an objective builds its pieces from: the job, the model config (after `model_config`),
    the tokenizer (None for synthetic data), the starting weights (params, or ``rng -> params``;
    before PEFT and heads: the reference of a fully fine-tuned policy) and a second network."""

    job: TrainJobConfig
    cfg: ModelConfig
    tokenizer: Any = None
    start: Any = None
    network: Optional[Network] = None


class Objective:
    """The base of every objective (module docstring). Subclasses set ``name`` and ``data_kinds``
    and implement `loss` and `streams`; the rest has defaults."""

    name: str = ""
    data_kinds: tuple[str, ...] = ()
    unit: str = "tokens"  # what the loss's weight counts (tokens, pairs, examples, completions): logs and reports name it
    generates: bool = False  # the trained model decodes text (a language-model policy): `jaxtune.job.lowering`

    def model_config(self, cfg: ModelConfig) -> ModelConfig:
        return cfg

    def network(self, job: TrainJobConfig) -> Optional[Network]:
        """A second network trained beside the policy (loaded once per job), or None."""
        return None

    def network_config(self, job: TrainJobConfig) -> Optional[ModelConfig]:
        """The architecture of `network`, read without its weights (for the memory estimate)."""
        return None

    def head(self, ctx: Context) -> Optional[HeadSpec]:
        return None

    def reference(self, job: TrainJobConfig) -> str:
        """Where the reference policy comes from: none | adapter (the adapter-disabled policy) |
        precomputed (log-probs of the starting weights, before training) | batch (the rollout's)."""
        return "none"

    def loss(self, ctx: Context) -> LossFn:
        raise NotImplementedError

    def streams(self, ctx: Context, *, train: bool = True) -> Streams:
        raise NotImplementedError

    def batch_extras(self, ctx: Context, rows: int, seq: int) -> dict:
        """The arrays (as ``jax.ShapeDtypeStruct``) this objective's batches carry beyond the language-model
        layout (tokens, targets, segment_ids, positions, loss_mask): what `jaxtune estimate` traces."""
        return {}

    def eval_metrics(self, ctx: Context, params: Any, batches: Iterable[dict], limit: Optional[int]) -> dict:
        raise ValueError(f"objective {self.name} has no metrics besides the held-out loss "
                         "(eval task classify: objective.kind classification / regression)")


def abstract_floats(names: Iterable[str], shape: tuple[int, ...]) -> dict:
    """float32 ``jax.ShapeDtypeStruct``s of ``shape`` by name (`Objective.batch_extras`)."""
    return {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name in names}


def abstract_pairs(rows: int, seq: int) -> dict:
    """A preference batch of ``rows`` pairs (`jaxtune.data.preference`): each side's language-model
    rows and ``pair_mask``."""
    out = {"pair_mask": jax.ShapeDtypeStruct((rows,), jnp.float32)}
    for side in ("chosen", "rejected"):
        out.update({f"{side}_{k}": jax.ShapeDtypeStruct((rows, seq), jnp.int32)
                    for k in ("tokens", "targets", "segment_ids", "positions")})
        out[f"{side}_loss_mask"] = jax.ShapeDtypeStruct((rows, seq), jnp.float32)
    return out


_REGISTRY: dict[str, Objective] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: one instance of ``cls`` serves ``objective.kind == cls.name``."""
    if cls.name not in OBJECTIVES:
        raise ValueError(f"objective {cls.name!r} is not an ObjectiveConfig.kind ({' | '.join(OBJECTIVES)})")
    if cls.name in _REGISTRY:
        raise ValueError(f"objective {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def get_objective(name: str) -> Objective:
    if name not in _REGISTRY:
        raise ValueError(f"objective.kind: no objective {name!r} is registered ({' | '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def registered() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))

