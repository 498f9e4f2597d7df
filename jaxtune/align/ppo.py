"""PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022) as a rollout stream plus a loss for the one loop.

Rollout (`PPORolloutStream`): ``batch_size x minibatches`` prompts sampled once each from the
current policy; the completion is scored by a reward model (a run with ``objective.kind=reward``)
or a Python reward function, ``missing_eos_penalty`` is subtracted from completions that did not
stop; the per-token reward is ``-β · KL_t`` (k1 ``log π_old - log π_ref``, or k3) with the score
added at the last token; values come at sampling time from the value head on the policy's trunk
(``params["value_head"]``) or, with ``value_model`` (a run directory: TRL's choice is the reward
model), from a separate value network ``params["value_model"]`` (that run's weights, adapters
merged, without an LM head; its one-output score head, if it has one, starts the value head),
trained fully alongside the policy; advantages and returns by GAE (γ, λ), advantages whitened over the
rollout. The rollout is then cut into ``minibatches`` and visited ``epochs`` times in a seeded
order, one optimizer step per minibatch. β is fixed or adapted toward ``kl_target`` (the
proportional controller of Ziegler et al.) after each rollout.

Loss per completion token: ``max(-A ρ, -A clip(ρ, 1±ε))`` + ``vf_coef · ½ max((V - R)², (V_clip - R)²)``
with ``V_clip = V_old + clip(V - V_old, ±value_clip)``, the mean over the minibatch's completion
tokens. Logged per rollout row: score, kl, entropy, clip_fraction, value_loss, explained_variance.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.align.rewards import reward_function
from jaxtune.align.rollout import (
    PolicyStream,
    empty_rollout_rows,
    prompt_items,
    prompt_order,
    sample_completions,
    write_completion,
)
from jaxtune.generate.sampling import SamplingConfig
from jaxtune.generate.text import stop_tokens_of
from jaxtune.models.decoder import is_trunk_key
from jaxtune.models.heads import SCORE, VALUE_HEAD, VALUE_MODEL, init_scalar_head, scalar_head
from jaxtune.models.scoring import jitted_token_logps, token_logps
from jaxtune.peft.core import ADDED_KEYS, base_model, merge_adapters
from jaxtune.quant.weight import dequantize
from jaxtune.utils.moved import moved_names

__getattr__ = moved_names(__name__, {
    "add_value_head": "jaxtune.models.heads.add_head(params, HeadSpec(VALUE_HEAD), cfg, rng)",
    "add_value_model": "jaxtune.job.objectives.get_objective('ppo').network(job)",
})


@dataclass(frozen=True)
class PPOConfig:
    """``objective.ppo``."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    reward: Optional[str] = None  # a Python reward (jaxtune.align.rewards), or use reward_model
    reward_model: Optional[str] = None  # a reward-model run directory (objective.kind=reward)
    missing_eos_penalty: Optional[float] = None
    kl_coef: float = 0.05  # β (the initial one when adaptive)
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_target: Optional[float] = None  # adaptive β toward this KL per completion (None: fixed β)
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    epochs: int = 4
    minibatches: int = 1  # the rollout holds train.batch_size x minibatches completions
    whiten_advantages: bool = True
    value_model: Optional[str] = None  # a run / params checkpoint directory: a separate value network (None: shared trunk)

    def __post_init__(self):
        if self.reward is not None and self.reward_model is not None:
            raise ValueError("objective.ppo: set one of reward (a function) and reward_model (a run directory)")
        if self.epochs < 1 or self.minibatches < 1 or self.max_new_tokens < 1:
            raise ValueError("objective.ppo: epochs, minibatches and max_new_tokens must be >= 1")


def gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation over each row's masked steps (contiguous, in order):
    ``δ_t = r_t + γ V_{t+1} - V_t`` (V after the last step is 0), ``A_t = δ_t + γλ A_{t+1}``;
    -> (advantages, returns = A + V), 0 off the mask."""
    adv = np.zeros_like(rewards, dtype=np.float64)
    for b in range(rewards.shape[0]):
        steps = np.flatnonzero(mask[b] > 0)
        running, next_value = 0.0, 0.0
        for t in steps[::-1]:
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            adv[b, t] = running
            next_value = values[b, t]
    return adv.astype(np.float32), ((adv + values) * mask).astype(np.float32)


def value_network(params: Any, cfg, rng: jax.Array, where: str = "objective.ppo.value_model") -> Any:
    """A separate value network from a model's params: adapters merged, quantized kernels
    dequantized, the LM head and other heads dropped; its one-output `SCORE` head (a reward
    model's) becomes the value head, else a fresh one."""
    added = [k for k in ADDED_KEYS if k in params]
    if added:
        raise ValueError(f"{where}: a value network cannot carry prompt-side PEFT subtrees ({', '.join(added)})")
    score = params.get(SCORE)
    tree = dequantize(merge_adapters({k: v for k, v in params.items() if is_trunk_key(k)}))
    head = score if score is not None and score["kernel"].shape[-1] == 1 else init_scalar_head(rng, cfg)
    return {**tree, VALUE_HEAD: head}


def state_values(params, hidden, rows, value_model=None, rng=None) -> jax.Array:
    """V per position [B, S]: the value head on the policy's ``hidden``, or the separate value network."""
    if value_model is None:
        return scalar_head(params[VALUE_HEAD], hidden)
    own, _ = value_model.hidden(params[VALUE_MODEL], rows["tokens"], positions=rows.get("positions"),
                                segment_ids=rows["segment_ids"], rng=rng)
    return scalar_head(params[VALUE_MODEL][VALUE_HEAD], own)


def _forward(model, params, rows, rng=None, value_model=None):
    logp, entropy, hidden = token_logps(model, params, rows, rng, with_entropy=True)
    return logp, entropy, state_values(params, hidden, rows, value_model, rng)


@partial(jax.jit, static_argnums=(0, 3))
def _values(model, params, rows, value_model=None):
    if value_model is None:
        hidden, _ = model.hidden(params, rows["tokens"], positions=rows.get("positions"), segment_ids=rows["segment_ids"])
        return state_values(params, hidden, rows)
    return state_values(params, None, rows, value_model)


def ppo_loss(model, cfg: PPOConfig, value_model=None):
    """The PPO loss (module docstring); ``value_model``: the separate value network's `Model`, or None."""

    def loss_fn(params, batch, rng):
        logp, entropy, values = _forward(model, params, batch, rng, value_model)
        mask = batch["loss_mask"].astype(jnp.float32)
        tokens = jnp.maximum(jnp.sum(mask), 1.0)
        adv = batch["advantages"]
        ratio = jnp.exp(logp - batch["old_logps"])
        pg = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps))
        v_old, returns = batch["old_values"], batch["returns"]
        v_clip = v_old + jnp.clip(values - v_old, -cfg.value_clip, cfg.value_clip)
        vf = 0.5 * jnp.maximum(jnp.square(values - returns), jnp.square(v_clip - returns))
        n = jnp.asarray(mask.shape[0], jnp.float32)
        mean = lambda x: jnp.sum(x * mask) / tokens  # noqa: E731  (over the minibatch's completion tokens)
        total = n * (mean(pg) + cfg.vf_coef * mean(vf))
        clipped = (jnp.abs(ratio - 1.0) > cfg.clip_eps).astype(jnp.float32)
        sg = jax.lax.stop_gradient
        metrics = {"score": jnp.sum(batch["scores"]), "kl": jnp.sum(batch["kl"]), "entropy": n * mean(sg(entropy)),
                   "clip_fraction": n * mean(clipped), "value_loss": n * mean(sg(vf)), "policy_loss": n * mean(sg(pg)),
                   "explained_variance": jnp.sum(batch["explained_variance"])}
        return total, n, metrics

    return loss_fn


class PPORolloutStream(PolicyStream):
    """Rollouts and minibatches for PPO (module docstring). ``reference_params``: the starting weights
    of a fully fine-tuned policy (a PEFT policy's reference is its adapter-disabled self)."""

    def __init__(self, records, cfg: PPOConfig, model, tokenizer, sft, *, batch_size: int, seq_len: int, seed: int = 0,
                 add_bos: bool = False, reference_params: Any = None, scorer=None, value_model=None):
        if (cfg.reward is None) == (scorer is None):
            raise ValueError("objective.ppo: set exactly one of reward (a function) and reward_model (a run directory)")
        self.items = prompt_items(records, sft, tokenizer, add_bos=add_bos, max_new_tokens=cfg.max_new_tokens,
                                  seq_len=seq_len)
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.batch_size, self.seq_len, self.seed, self.reference_params = batch_size, seq_len, seed, reference_params
        self.reward_fn = reward_function(cfg.reward) if cfg.reward is not None else None
        self.scorer, self.value_model = scorer, value_model
        self.kl_coef = cfg.kl_coef
        self.rollouts, self.visit, self._rollout = 0, 0, None

    def __next__(self) -> dict:
        per_rollout = self.cfg.epochs * self.cfg.minibatches
        if self._rollout is None or self.visit >= per_rollout:
            self.require_policy()
            self._rollout = self.rollout(self.rollouts)
            self.rollouts += 1
            self.visit = 0
        epoch, part = divmod(self.visit, self.cfg.minibatches)
        order = np.random.default_rng([self.seed, self.rollouts, epoch]).permutation(self.batch_size * self.cfg.minibatches)
        rows = order[part * self.batch_size: (part + 1) * self.batch_size]
        self.visit += 1
        return {k: v[rows] for k, v in self._rollout.items()}

    def rollout(self, index: int) -> dict:
        cfg, n = self.cfg, self.batch_size * self.cfg.minibatches
        items = self.items
        chosen = prompt_order(self.seed, len(items), index * n, n)
        pad = int(self.model.cfg.pad_token_id or 0)
        stops = stop_tokens_of(self.tokenizer, self.model.cfg)
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, stop_tokens=stops,
                                  pad_token_id=pad)
        out = sample_completions(self.model, self.policy, [items[i].ids for i in chosen],
                                 jax.random.fold_in(jax.random.key(self.seed), index), sampling)
        rows = empty_rollout_rows(n, self.seq_len)
        texts, prompt_texts, last = [], [], np.zeros(n, np.int64)
        scores = np.zeros(n, np.float32)
        for row, i in enumerate(chosen):
            completion = [int(t) for t in out.tokens[row, : out.lengths[row]]]
            item = items[i]
            text = self.tokenizer.decode([t for t in completion if t not in stops])
            texts.append(text)
            prompt_texts.append(item.text)  # the rendered prompt (decoding ids would drop special tokens)
            if self.reward_fn is not None:
                scores[row] = float(self.reward_fn(text, item.reference, item.record))
            last[row] = write_completion(rows, row, item.ids, completion)
        if self.scorer is not None:
            scores = np.asarray(self.scorer(prompt_texts, texts), np.float32)
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~np.asarray(out.stopped)).astype(np.float32)
        m = rows["loss_mask"]
        old = np.asarray(jitted_token_logps(self.model, self.policy, rows))
        reference = self.reference_params if self.reference_params is not None else base_model(self.policy)
        ref = np.asarray(jitted_token_logps(self.model, reference, rows))
        d = ref - old
        kl_tok = (old - ref) if cfg.kl_estimator == "k1" else (np.exp(d) - d - 1.0)
        kl_tok = kl_tok * m
        values = np.asarray(_values(self.model, self.policy, rows, self.value_model)) * m
        rewards = -self.kl_coef * kl_tok
        rewards[np.arange(n), last] += scores
        adv, returns = gae(rewards, values, m, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            mu, sd = adv[m > 0].mean(), adv[m > 0].std()
            adv = (adv - mu) / (sd + 1e-8) * m
        kl_seq = kl_tok.sum(1)
        var = np.var(returns[m > 0])
        explained = 1.0 - np.var((returns - values)[m > 0]) / var if var > 0 else 0.0
        if cfg.kl_target is not None:  # Ziegler et al.'s proportional controller
            error = np.clip(kl_seq.mean() / cfg.kl_target - 1.0, -0.2, 0.2)
            self.kl_coef = float(self.kl_coef * (1.0 + error * n / cfg.kl_horizon))
        return {**rows, "old_logps": old * m, "old_values": values, "advantages": adv, "returns": returns,
                "scores": scores, "kl": kl_seq.astype(np.float32),
                "explained_variance": np.full(n, explained, np.float32)}

    def get_state(self) -> dict:
        return {"kind": "ppo", "rollouts": self.rollouts, "seed": self.seed, "kl_coef": float(self.kl_coef),
                "prompts": len(self.items)}

    def set_state(self, state: dict) -> None:
        if state.get("kind") != "ppo" or state.get("seed") != self.seed or state.get("prompts") != len(self.items):
            raise ValueError(f"data state {state} does not match this PPO stream")
        self.rollouts, self.kl_coef, self._rollout = int(state["rollouts"]), float(state["kl_coef"]), None
