"""Heads over decoder hidden states: pure functions over their own small param dicts, and the
named heads a job adds beside the trunk.

- value / reward head: hidden [batch, seq, embed] -> [batch, seq] scalars
  (PPO values per token; a reward model reads the last real token).
- sequence classification: pooled hidden -> [batch, num_labels] logits
  (pooling: the last non-padding token, as Hugging Face does for decoders, the mean, or ``cls``:
  the first token through the model's pooler, as BERT does).

Named heads live at a top-level key of the param tree, beside the trunk the model reads (so PEFT
target patterns never reach them): `SCORE` (classification, regression, reward: the classifier
head), `VALUE_HEAD` (PPO: the scalar head on the policy's own hidden states), `VALUE_MODEL`
(PPO: a separate value network, its own trunk with a `VALUE_HEAD`) and `NSP` (BERT's
next-sentence classifier over the pooled first token). A `HeadSpec` names one;
`add_head` puts it on a tree and `head_template` gives its structure for a restore.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp

from jaxtune.models.config import ModelConfig
from jaxtune.models.decoder import Model, is_trunk_key, pooled_output
from jaxtune.ops import linear

SCORE = "score"
VALUE_HEAD = "value_head"
VALUE_MODEL = "value_model"
NSP = "nsp"
HEAD_KEYS = (SCORE, VALUE_HEAD, VALUE_MODEL, NSP)
POOLINGS = ("last", "mean", "cls")


@dataclass(frozen=True)
class HeadSpec:
    """A named head: ``key`` (one of `HEAD_KEYS`), its ``outputs`` (classes; 1 for a score or a
    value), ``pooling`` (`SCORE`), ``model_config`` (`VALUE_MODEL`: the value network's architecture)."""

    key: str
    outputs: int = 1
    pooling: Literal["last", "mean", "cls"] = "last"
    model_config: Optional[ModelConfig] = None

    def __post_init__(self):
        if self.key not in HEAD_KEYS:
            raise ValueError(f"head: unknown key {self.key!r} ({' | '.join(HEAD_KEYS)})")
        if self.key == NSP:
            if self.outputs != 2:
                raise ValueError(f"head {NSP}: {self.outputs} outputs (next sentence or not: 2)")
        elif self.outputs < 1 or (self.key != SCORE and self.outputs != 1):
            raise ValueError(f"head {self.key}: {self.outputs} outputs (a value head has 1, a score head >= 1)")
        if self.pooling not in POOLINGS:
            raise ValueError(f"head {self.key}: unknown pooling {self.pooling!r} ({' | '.join(POOLINGS)})")
        if (self.key == VALUE_MODEL) != (self.model_config is not None):
            raise ValueError(f"head {self.key}: model_config is the architecture of a {VALUE_MODEL} (and only of it)")

    @property
    def pattern(self) -> str:
        """The regex over param paths that selects the head (it is always trainable)."""
        return f"^{self.key}/"


def add_head(params: Any, spec: HeadSpec, cfg: ModelConfig, rng: jax.Array, network: Any = None) -> Any:
    """``params -> params`` with the head at ``spec.key``: a fresh classifier (`SCORE`) or value
    head (`VALUE_HEAD`), or ``network``, the value network's params (`VALUE_MODEL`)."""
    if spec.key in params:
        raise ValueError(f'params already hold a "{spec.key}" head')
    if spec.key == VALUE_MODEL:
        if network is None:
            raise ValueError(f"head {VALUE_MODEL}: pass the value network's params (network=...)")
        value = network
    elif spec.key == VALUE_HEAD:
        value = init_scalar_head(rng, cfg)
    elif spec.key == NSP:
        value = init_classifier_head(rng, cfg, 2)
    else:
        value = init_classifier_head(rng, cfg, spec.outputs)
    return {**params, spec.key: value}


def value_network_template(vcfg: ModelConfig) -> Any:
    """The structure of a `VALUE_MODEL` subtree for ``vcfg``: its trunk and a value head."""

    def build():
        trunk = {k: v for k, v in Model(vcfg).init(jax.random.key(0)).items() if is_trunk_key(k)}
        return {**trunk, VALUE_HEAD: init_scalar_head(jax.random.key(0), vcfg)}

    return jax.eval_shape(build)


def head_template(spec: HeadSpec, cfg: ModelConfig) -> Any:
    """Zeros in the head's structure (shapes and dtypes from ``cfg``, or ``spec.model_config``):
    what a restore fills from a checkpoint."""
    if spec.key == VALUE_MODEL:
        shape = value_network_template(spec.model_config)
    else:
        n = spec.outputs
        shape = {"kernel": jax.ShapeDtypeStruct((cfg.hidden_size, n), cfg.weight_dtype),
                 "bias": jax.ShapeDtypeStruct((n,), cfg.weight_dtype)}
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shape)


def batch_token_types(cfg: ModelConfig, batch: dict) -> Optional[jax.Array]:
    """The batch's ``token_types`` for a model with a token-type embedding (BERT), else None
    (a decoder has no segment A / B embedding to read them with)."""
    return batch.get("token_types") if cfg.type_vocab_size else None


def batch_hidden(model: Model, params: Any, batch: dict, *, rng=None, tokens=None) -> jax.Array:
    """Hidden states [batch, seq, embed] of a padded-rows batch (``tokens`` replaces batch["tokens"],
    e.g. the masked inputs of a masked LM)."""
    hidden, _ = model.hidden(params, batch["tokens"] if tokens is None else tokens, positions=batch.get("positions"),
                             segment_ids=batch["segment_ids"], rng=rng, token_types=batch_token_types(model.cfg, batch))
    return hidden


def pooled(model: Model, params: Any, hidden: jax.Array, segment_ids: jax.Array, pooling: str) -> jax.Array:
    """One vector per row [batch, embed] float32: ``cls`` = the model's pooler over the first token
    (`pooled_output`), else `pool`."""
    if pooling == "cls":
        return pooled_output(params, hidden, model.cfg)
    return pool(hidden, segment_ids, pooling)


def classification_logits(model: Model, params: Any, batch: dict, *, pooling: str = "last", rng=None) -> jax.Array:
    """The `SCORE` head over the pooled hidden states of each row -> [batch, outputs] float32."""
    hidden = batch_hidden(model, params, batch, rng=rng)
    return dense_logits(params[SCORE], pooled(model, params, hidden, batch["segment_ids"], pooling))


def nsp_logits(model: Model, params: Any, hidden: jax.Array) -> jax.Array:
    """BERT's next-sentence logits [batch, 2] float32 (index 0: B follows A) from the `NSP` head over
    the pooled first token."""
    return dense_logits(params[NSP], pooled_output(params, hidden, model.cfg))


def dense_logits(head: dict, pooled: jax.Array) -> jax.Array:
    """A classifier head {'kernel': [embed, n], 'bias': [n]} over pooled vectors [batch, embed] -> [batch, n]."""
    return linear(pooled, head["kernel"], dtype=jnp.float32) + head["bias"].astype(jnp.float32)


def init_scalar_head(rng: jax.Array, cfg: ModelConfig) -> dict:
    """Params of a value/reward head: {'kernel': [embed, 1], 'bias': [1]}."""
    kernel = jax.random.normal(rng, (cfg.hidden_size, 1), jnp.float32) / jnp.sqrt(cfg.hidden_size + 1.0)
    return {"kernel": kernel.astype(cfg.weight_dtype), "bias": jnp.zeros((1,), cfg.weight_dtype)}


def scalar_head(head: dict, hidden: jax.Array) -> jax.Array:
    """hidden: [batch, seq, embed] -> [batch, seq] float32."""
    out = linear(hidden.astype(jnp.float32), head["kernel"], dtype=jnp.float32) + head["bias"].astype(jnp.float32)
    return out[..., 0]


def init_classifier_head(rng: jax.Array, cfg: ModelConfig, num_labels: int) -> dict:
    """Params of a classification head: {'kernel': [embed, num_labels], 'bias': [num_labels]}."""
    kernel = jax.random.normal(rng, (cfg.hidden_size, num_labels), jnp.float32) * cfg.initializer_range
    return {"kernel": kernel.astype(cfg.weight_dtype), "bias": jnp.zeros((num_labels,), cfg.weight_dtype)}


def last_token_index(segment_ids: jax.Array) -> jax.Array:
    """Index of the last non-padding token of each row. segment_ids: [batch, seq] -> [batch]."""
    index = jnp.arange(segment_ids.shape[1])[None, :]
    return jnp.max(jnp.where(segment_ids != 0, index, -1), axis=1).clip(0)


def pool(hidden: jax.Array, segment_ids: jax.Array, how: Literal["last", "mean"] = "last") -> jax.Array:
    """hidden: [batch, seq, embed]; segment_ids: [batch, seq] -> [batch, embed] float32."""
    hidden = hidden.astype(jnp.float32)
    if how == "last":
        return jnp.take_along_axis(hidden, last_token_index(segment_ids)[:, None, None], axis=1)[:, 0]
    if how == "mean":
        mask = (segment_ids != 0).astype(jnp.float32)[..., None]
        return (hidden * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
    raise ValueError(f"pooling: unknown method {how!r} (last | mean; cls needs the model: `pooled`)")


def classifier_head(head: dict, hidden: jax.Array, segment_ids: jax.Array, how: str = "last") -> jax.Array:
    """-> logits [batch, num_labels] float32 (for regression, num_labels = 1)."""
    return dense_logits(head, pool(hidden, segment_ids, how))


def sequence_scores(head: dict, hidden: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Reward-model score of each sequence: the scalar head at its last real token. -> [batch]."""
    values = scalar_head(head, hidden)
    return jnp.take_along_axis(values, last_token_index(segment_ids)[:, None], axis=1)[:, 0]
