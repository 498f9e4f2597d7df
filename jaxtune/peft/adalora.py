"""AdaLoRA (Zhang et al., 2023) as a param-tree transform plus an optimizer wrapper.

``apply_adalora(params, cfg, rng)`` replaces every targeted kernel by an `AdaLoraWeight`:
the frozen base ``W: [in, out]`` plus an SVD-shaped increment ``P diag(E) Q`` with
``P: [in, r]`` (PEFT's ``lora_A`` transposed), ``E: [r]`` (PEFT's ``lora_E``, the "singular
values") and ``Q: [r, out]`` (PEFT's ``lora_B`` transposed). The one linear op computes it
factored, ``x @ W + s * ((dropout(x) @ P) * E) @ Q``; ``s = alpha / (init_r + 1e-5)`` as in
PEFT (its ``scaling / (ranknum + 1e-5)``). Init as PEFT: E = 0 (the model is unchanged at
step 0), P and Q ~ N(0, 0.02^2).

The rank allocator lives in the optimizer, so AdaLoRA runs in the one training loop unchanged:
``adalora_optimizer(inner, cfg)`` wraps any optax transformation and, in every ``update``,

1. adds the gradient of PEFT's orthogonality regulariser to the gradients of P and Q
   (``orth_reg_weight * mean over all P and Q matrices of ||P^T P - I||_F`` / ``||Q Q^T - I||_F``;
   PEFT adds exactly this to the loss, Frobenius norms *not* squared, divided by 2 x #adapters);
2. runs ``inner``;
3. updates the importance EMAs as PEFT's ``RankAllocator.update_ipt`` (sensitivity
   ``I = |theta * grad|`` smoothed with ``beta1``, uncertainty ``|I - I_bar|`` smoothed with
   ``beta2``; theta is the parameter *after* this step's update, because PEFT calls
   ``update_and_allocate`` after ``optimizer.step()``), while ``step < total_step - tfinal``;
4. on masking steps of PEFT's cubic budget schedule (`rank_budget`) ranks all triplets
   globally by ``score(E_i) + mean_j score(P_ji) + mean_k score(Q_ik)`` (score = EMA sensitivity
   x EMA uncertainty) and zeroes the E entries of the lowest ``init_budget - budget`` of them by
   adjusting the update so that the new ``E = (E + u) * mask``. At ``total_step - tfinal`` the
   mask is fixed at the target budget and then re-applied every step (PEFT's rank_pattern).

``step`` is the number of updates applied before this one (PEFT's 0-based ``global_step``).
Everything is traced: the budget is looked up in a table built once from PEFT's formula (so
it equals PEFT's float64 arithmetic exactly) and the threshold comes from a sort.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxtune.ops.linear import dropout, linear, register_linear
from jaxtune.parallel.rules import nested_specs, register_sharding
from jaxtune.peft.core import is_weight_leaf, merge_type, register_adapter
from jaxtune.utils.targets import map_targets, target_patterns
from jaxtune.utils.tree import keypath_str

INIT_STD = 0.02  # PEFT: nn.init.normal_(lora_A / lora_B, mean=0.0, std=0.02); lora_E zeros


@register_adapter
@jax.tree_util.register_dataclass
@dataclass
class AdaLoraWeight:
    """An AdaLoRA-adapted kernel: ``x @ base + scale * ((dropout(x) @ p) * e) @ q``.
    ``scale`` and ``dropout`` (on the adapter input, training steps only) are static."""

    base: Any  # [in, out]
    p: Any  # [in, r]   right singular vectors (PEFT lora_A, transposed)
    e: Any  # [r]       singular values (PEFT lora_E)
    q: Any  # [r, out]  left singular vectors (PEFT lora_B, transposed)
    scale: float = field(metadata=dict(static=True), default=1.0)
    dropout: float = field(metadata=dict(static=True), default=0.0)

    @property
    def rank(self) -> int:
        """The allocated (initial) rank; see `effective_ranks` for the live one."""
        return self.e.shape[-1]

    def delta(self) -> jax.Array:
        """``scale * (p * e) @ q`` in float32: the increment as a dense [in, out] matrix."""
        pe = self.p.astype(jnp.float32) * self.e.astype(jnp.float32)[None, :]
        return jnp.matmul(pe, self.q.astype(jnp.float32)) * self.scale

    def merged(self) -> jax.Array:
        """``base + scale * (p * e) @ q`` in the base's dtype (float32 accumulation)."""
        return (self.base.astype(jnp.float32) + self.delta()).astype(self.base.dtype)


@register_linear(AdaLoraWeight)
def _adalora_linear(x, w: AdaLoraWeight, *, dtype, rng=None):
    y = linear(x, w.base, dtype=dtype)
    h = linear(dropout(x, w.dropout, rng), w.p, dtype=dtype)
    h = h * w.e.astype(h.dtype)
    return y + w.scale * linear(h, w.q, dtype=dtype)


@register_sharding(AdaLoraWeight)
def _adalora_specs(w: AdaLoraWeight, spec: P) -> AdaLoraWeight:
    """P follows the base's input axis, Q its output axis; E and the rank axis are replicated."""
    in_axis = spec[0] if len(spec) > 0 else None
    out_axis = spec[1] if len(spec) > 1 else None
    return AdaLoraWeight(base=nested_specs(w.base, spec), p=P(in_axis, None), e=P(), q=P(None, out_axis), scale=w.scale, dropout=w.dropout)


def _is_ada(x) -> bool:
    return isinstance(x, AdaLoraWeight)


# --- config ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaLoraConfig:
    """AdaLoRA hyper-parameters, named and defaulted as PEFT's ``AdaLoraConfig`` (``alpha`` is
    its ``lora_alpha``, ``dropout`` its ``lora_dropout``). ``targets``: LoRA's preset names
    (attention, attention-qv, mlp, all-linear) or regexes over param paths. ``total_step`` is
    required: the budget schedule runs over it (train at least ``total_step - tfinal + 1``
    steps for the final mask to be fixed)."""

    total_step: int = 0
    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("attention",)
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5

    def __post_init__(self):
        if self.total_step is None or self.total_step <= 0:
            raise ValueError(f"adalora.total_step must be > 0 (the budget schedule needs it), got {self.total_step}")
        if self.init_r < 1:
            raise ValueError(f"adalora.init_r must be >= 1, got {self.init_r}")
        if not 0 <= self.target_r <= self.init_r:
            raise ValueError(f"adalora.target_r must be in [0, init_r={self.init_r}], got {self.target_r}")
        if self.tinit < 0 or self.tfinal < 0:
            raise ValueError(f"adalora.tinit / tfinal must be >= 0, got {self.tinit} / {self.tfinal}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"adalora: tinit ({self.tinit}) must be < total_step - tfinal "
                             f"({self.total_step} - {self.tfinal}): the schedule has no budgeting phase")
        if self.deltaT < 1:
            raise ValueError(f"adalora.deltaT must be >= 1, got {self.deltaT}")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"adalora.{name} must be in (0, 1), got {getattr(self, name)}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"adalora.orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adalora.dropout must be in [0, 1), got {self.dropout}")
        target_patterns(self.targets, "adalora.targets")

    @property
    def scale(self) -> float:
        """PEFT's ``scaling / (ranknum + 1e-5)``: ``lora_alpha`` (or r when alpha <= 0) over the
        float32 ``init_r + 1e-5``."""
        scaling = float(self.alpha) if self.alpha > 0 else float(self.init_r)
        return scaling / float(np.float32(self.init_r) + np.float32(1e-5))


def apply_adalora(params: Any, cfg: AdaLoraConfig, rng: jax.Array) -> Any:
    """A new tree with every targeted 2-D kernel replaced by an `AdaLoraWeight` (E = 0, P, Q ~
    N(0, 0.02^2) in the kernel's dtype). Raises if no path matches or a target is already adapted."""
    keys = iter(jax.random.split(rng, max(1, len(jax.tree.leaves(params)))))

    def adapt(where, leaf):
        if _is_ada(leaf):
            raise ValueError(f"adalora: {where} already has an AdaLoRA adapter")
        if getattr(leaf, "ndim", None) != 2:
            raise ValueError(f"adalora: target {where} is not a 2-D kernel (shape {getattr(leaf, 'shape', None)})")
        fan_in, fan_out = leaf.shape
        kp, kq = jax.random.split(next(keys))
        r = cfg.init_r
        p = INIT_STD * jax.random.normal(kp, (fan_in, r), jnp.float32)
        q = INIT_STD * jax.random.normal(kq, (r, fan_out), jnp.float32)
        e = jnp.zeros((r,), jnp.float32)
        dt = leaf.dtype
        return AdaLoraWeight(base=leaf, p=p.astype(dt), e=e.astype(dt), q=q.astype(dt),
                             scale=cfg.scale, dropout=cfg.dropout)

    return map_targets(params, cfg.targets, adapt, key="adalora.targets",
                       is_leaf=lambda x: _is_ada(x) or is_weight_leaf(x))


def merge_adalora(params: Any) -> Any:
    """Every `AdaLoraWeight` folded into a plain kernel ``base + s * (P*E) @ Q``."""
    return merge_type(params, AdaLoraWeight)


def effective_ranks(params: Any) -> dict[str, int]:
    """``{path: number of nonzero E entries}`` for every `AdaLoraWeight` (full or trainable tree)."""
    out = {}

    def visit(path, x):
        if _is_ada(x):
            out[keypath_str(path)] = int(jnp.count_nonzero(x.e))
        return x

    jax.tree_util.tree_map_with_path(visit, params, is_leaf=_is_ada)
    return out


# --- budget schedule ---------------------------------------------------------------------------


def _budget_py(step: int, cfg: AdaLoraConfig, init_bgt: int, target_bgt: int) -> tuple[int, bool]:
    """PEFT's ``RankAllocator.budget_schedule``, line for line (float64 Python arithmetic)."""
    tinit, tfinal, total_step = cfg.tinit, cfg.tfinal, cfg.total_step
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt)
    return budget, step % cfg.deltaT == 0


def rank_budget(step, cfg: AdaLoraConfig, num_adapters: int, init_budget: Optional[int] = None):
    """-> (budget, mask_now) at ``step``, as PEFT's ``RankAllocator.budget_schedule``: the total
    rank budget (``init_budget`` = init_r x #adapters until ``tinit``, cubic decrease to
    target_r x #adapters at ``total_step - tfinal``, then constant) and whether this step masks
    (every ``deltaT`` steps in the cubic phase, always after it). A Python int step gives Python
    values; a traced / array step gives int32 / bool arrays (a table lookup built from the same
    float64 formula, so the two agree exactly)."""
    init_bgt = cfg.init_r * num_adapters if init_budget is None else int(init_budget)
    target_bgt = cfg.target_r * num_adapters
    if isinstance(step, (int, np.integer)):
        return _budget_py(int(step), cfg, init_bgt, target_bgt)
    tinit, end = cfg.tinit, cfg.total_step - cfg.tfinal
    table = np.array([_budget_py(s, cfg, init_bgt, target_bgt)[0] for s in range(tinit + 1, end + 1)], np.int32)
    step = jnp.asarray(step, jnp.int32)
    cubic = jnp.asarray(table)[jnp.clip(step - tinit - 1, 0, len(table) - 1)]
    budget = jnp.where(step <= tinit, init_bgt, jnp.where(step > end, target_bgt, cubic)).astype(jnp.int32)
    mask_now = jnp.where(step <= tinit, False, jnp.where(step > end, True, step % cfg.deltaT == 0))
    return budget, mask_now


# --- regulariser and importance ----------------------------------------------------------------


def _fro(m: jax.Array) -> jax.Array:
    """Frobenius norm with a zero (not NaN) gradient at 0 (torch's subgradient there)."""
    sq = jnp.sum(jnp.square(m))
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def _orth_reg(pairs: list[tuple[jax.Array, jax.Array]]) -> jax.Array:
    terms = []
    for p, q in pairs:
        p, q = p.astype(jnp.float32), q.astype(jnp.float32)
        r = p.shape[-1]
        eye = jnp.eye(r, dtype=jnp.float32)
        terms.append(_fro(p.T @ p - eye))  # PEFT: lora_A @ lora_A.T
        terms.append(_fro(q @ q.T - eye))  # PEFT: lora_B.T @ lora_B
    if not terms:
        return jnp.zeros((), jnp.float32)
    return sum(terms) / len(terms)


def orthogonal_regularizer(params: Any) -> jax.Array:
    """PEFT's AdaLoRA regulariser (before ``orth_reg_weight``): the mean, over every P and Q of
    every `AdaLoraWeight`, of ``||P^T P - I||_F`` and ``||Q Q^T - I||_F`` (norms, not squared)."""
    leaves = [x for x in jax.tree.leaves(params, is_leaf=_is_ada) if _is_ada(x)]
    return _orth_reg([(x.p, x.q) for x in leaves])


def update_importance(ipt: Any, unc: Any, params: Any, grads: Any, cfg: AdaLoraConfig) -> tuple[Any, Any]:
    """One step of PEFT's ``RankAllocator.update_ipt`` on trees of the params' structure:
    ``I = |param * grad|``; ``ipt <- beta1 ipt + (1 - beta1) I``;
    ``unc <- beta2 unc + (1 - beta2) |I - ipt|`` (with the new ipt). float32."""
    b1, b2 = cfg.beta1, cfg.beta2

    def one(i, u, p, g):
        cur = jnp.abs(p.astype(jnp.float32) * g.astype(jnp.float32))
        i = b1 * i + (1 - b1) * cur
        u = b2 * u + (1 - b2) * jnp.abs(cur - i)
        return i, u

    out = jax.tree.map(one, ipt, unc, params, grads)
    outer = jax.tree.structure(ipt)
    return jax.tree.transpose(outer, jax.tree.structure((0, 0)), out)


def triplet_scores(ipt: AdaLoraWeight, unc: AdaLoraWeight) -> jax.Array:
    """[r] scores of one adapter's (P column, E entry, Q row) triplets from its EMA trees, as
    PEFT's ``mask_to_budget``: ``s(E_i) + (mean_j s(P_ji) + mean_k s(Q_ik))``, s = ipt * unc."""
    s_e = ipt.e * unc.e
    s_p = jnp.mean(ipt.p * unc.p, axis=0)
    s_q = jnp.mean(ipt.q * unc.q, axis=1)
    return s_e + (s_p + s_q)


# --- the rank allocator as an optimizer wrapper ------------------------------------------------


class AdaLoraState(NamedTuple):
    count: jax.Array  # int32: updates applied so far (PEFT's global_step of the next update)
    ipt: Any  # params-shaped: EMA sensitivity (adapter P/E/Q; a scalar 0 for any other leaf)
    unc: Any  # params-shaped: EMA uncertainty
    mask: Any  # params-shaped: each adapter's ``e`` slot holds its bool [r] triplet mask
    inner: Any  # the wrapped optimizer's state


def _stat_like(x):
    if _is_ada(x):
        zeros = lambda a: jnp.zeros(a.shape, jnp.float32)  # noqa: E731
        return AdaLoraWeight(base=jax.tree.map(lambda _: jnp.zeros((), jnp.float32), x.base),
                             p=zeros(x.p), e=zeros(x.e), q=zeros(x.q), scale=x.scale, dropout=x.dropout)
    return jnp.zeros((), jnp.float32)


def _mask_like(x):
    if _is_ada(x):
        no = lambda: jnp.zeros((), jnp.bool_)  # noqa: E731
        return AdaLoraWeight(base=jax.tree.map(lambda _: no(), x.base), p=no(),
                             e=jnp.ones(x.e.shape, jnp.bool_), q=no(), scale=x.scale, dropout=x.dropout)
    return jnp.zeros((), jnp.bool_)


def find_allocator_state(opt_state: Any) -> AdaLoraState:
    """The `AdaLoraState` inside an optimizer state (also inside optax.chain tuples)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, AdaLoraState))
             if isinstance(s, AdaLoraState)]
    if len(found) != 1:
        raise ValueError(f"expected one AdaLoraState in the optimizer state, found {len(found)}")
    return found[0]


def rank_pattern(opt_state: Any) -> dict[str, np.ndarray]:
    """``{path: bool [r]}``: the allocator's current triplet mask per adapter (PEFT's rank_pattern)."""
    state = find_allocator_state(opt_state)
    out = {}

    def visit(path, m):
        if _is_ada(m):
            out[keypath_str(path)] = np.asarray(m.e)
        return m

    jax.tree_util.tree_map_with_path(visit, state.mask, is_leaf=_is_ada)
    return out


def adalora_optimizer(inner: optax.GradientTransformation, cfg: AdaLoraConfig) -> optax.GradientTransformation:
    """``inner`` wrapped with AdaLoRA's orthogonality regulariser and rank allocator (see the
    module docstring). ``update`` needs ``params`` (the trainable tree the updates apply to);
    every `AdaLoraWeight` in it must carry its P, E and Q."""
    end = cfg.total_step - cfg.tfinal

    def init(params):
        return AdaLoraState(
            count=jnp.zeros((), jnp.int32),
            ipt=jax.tree.map(_stat_like, params, is_leaf=_is_ada),
            unc=jax.tree.map(_stat_like, params, is_leaf=_is_ada),
            mask=jax.tree.map(_mask_like, params, is_leaf=_is_ada),
            inner=inner.init(params),
        )

    def update(grads, state: AdaLoraState, params=None):
        if params is None:
            raise ValueError("adalora_optimizer.update needs params (the trainable tree)")
        p_leaves, treedef = jax.tree.flatten(params, is_leaf=_is_ada)
        ada = [i for i, x in enumerate(p_leaves) if _is_ada(x)]
        if not ada:
            raise ValueError("adalora_optimizer: the trainable params hold no AdaLoraWeight (apply_adalora first, "
                             "and mark P, E, Q trainable)")
        for i in ada:
            if any(getattr(p_leaves[i], k) is None for k in ("p", "e", "q")):
                raise ValueError("adalora_optimizer: every AdaLoraWeight needs trainable p, e and q")
        g_leaves = treedef.flatten_up_to(grads)
        count = state.count

        # (1) the orthogonality regulariser's gradient on P and Q
        if cfg.orth_reg_weight:
            pq = [(p_leaves[i].p, p_leaves[i].q) for i in ada]
            reg_grads = jax.grad(_orth_reg)(pq)
            for i, (dp, dq) in zip(ada, reg_grads):
                g = g_leaves[i]
                g_leaves[i] = AdaLoraWeight(
                    base=g.base, e=g.e,
                    p=(g.p.astype(jnp.float32) + cfg.orth_reg_weight * dp).astype(g.p.dtype),
                    q=(g.q.astype(jnp.float32) + cfg.orth_reg_weight * dq).astype(g.q.dtype),
                    scale=g.scale, dropout=g.dropout)
        grads = jax.tree.unflatten(treedef, g_leaves)

        # (2) the wrapped optimizer
        updates, inner_state = inner.update(grads, state.inner, params)
        u_leaves = treedef.flatten_up_to(updates)

        # (3) importance EMAs on the updated adapter weights (PEFT runs after optimizer.step())
        ipt_leaves = treedef.flatten_up_to(state.ipt)
        unc_leaves = treedef.flatten_up_to(state.unc)
        mask_leaves = treedef.flatten_up_to(state.mask)
        learning = count < end
        new_ipt, new_unc, scores = {}, {}, []
        for i in ada:
            w, u, g = p_leaves[i], u_leaves[i], g_leaves[i]
            stepped = {k: (getattr(w, k) + getattr(u, k)).astype(getattr(w, k).dtype) for k in ("p", "e", "q")}
            upd = {k: update_importance(getattr(ipt_leaves[i], k), getattr(unc_leaves[i], k), stepped[k],
                                        getattr(g, k), cfg) for k in ("p", "e", "q")}
            ipt_i = AdaLoraWeight(base=ipt_leaves[i].base, scale=w.scale, dropout=w.dropout,
                                  **{k: jnp.where(learning, upd[k][0], getattr(ipt_leaves[i], k)) for k in upd})
            unc_i = AdaLoraWeight(base=unc_leaves[i].base, scale=w.scale, dropout=w.dropout,
                                  **{k: jnp.where(learning, upd[k][1], getattr(unc_leaves[i], k)) for k in upd})
            scores.append(triplet_scores(ipt_i, unc_i))
            # PEFT resets the EMAs once the final mask is fixed (they are never used again)
            new_ipt[i] = jax.tree.map(lambda a: jnp.where(count >= end, 0.0, a), ipt_i)
            new_unc[i] = jax.tree.map(lambda a: jnp.where(count >= end, 0.0, a), unc_i)

        # (4) budget -> threshold -> mask, applied to E through the update
        ranks = [p_leaves[i].e.shape[0] for i in ada]
        init_bgt = sum(ranks)
        budget, mask_ind = rank_budget(count, cfg, len(ada), init_budget=init_bgt)
        all_scores = jnp.concatenate(scores)
        k = init_bgt - budget  # how many triplets to mask (PEFT: kthvalue(k) then score <= threshold)
        ordered = jnp.sort(all_scores)
        threshold = jnp.where(k > 0, ordered[jnp.clip(k - 1, 0, init_bgt - 1)], -jnp.inf)
        keep_all = all_scores > threshold
        compute = (learning & mask_ind) | (count == end)
        apply = compute | (count > end)
        offsets = np.cumsum([0] + ranks)
        for j, i in enumerate(ada):
            keep = jnp.where(compute, keep_all[offsets[j]:offsets[j + 1]], mask_leaves[i].e)
            mask_leaves[i] = AdaLoraWeight(base=mask_leaves[i].base, p=mask_leaves[i].p, e=keep, q=mask_leaves[i].q,
                                           scale=mask_leaves[i].scale, dropout=mask_leaves[i].dropout)
            w, u = p_leaves[i], u_leaves[i]
            u_e = jnp.where(apply & ~keep, -w.e.astype(u.e.dtype), u.e)
            u_leaves[i] = AdaLoraWeight(base=u.base, p=u.p, e=u_e, q=u.q, scale=u.scale, dropout=u.dropout)
            ipt_leaves[i], unc_leaves[i] = new_ipt[i], new_unc[i]

        new_state = AdaLoraState(
            count=count + 1,
            ipt=jax.tree.unflatten(treedef, ipt_leaves),
            unc=jax.tree.unflatten(treedef, unc_leaves),
            mask=jax.tree.unflatten(treedef, mask_leaves),
            inner=inner_state,
        )
        return jax.tree.unflatten(treedef, u_leaves), new_state

    return optax.GradientTransformation(init, update)
