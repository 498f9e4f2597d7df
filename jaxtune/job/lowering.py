"""A job's programs lowered for an accelerator this machine does not have (`jaxtune estimate --lower`).

`lower_job(job, platforms)` builds the job's training step as `jaxtune.job.plan_step` does (abstract
values: no weights read, nothing allocated), sharded on the job's mesh, and lowers three programs
for each platform (``cuda``, ``tpu``; ``cpu`` too) without compiling them:

- ``train``: the jitted train step (loss, gradients, optimizer update);
- ``eval``: the eval step (the loss sums, no dropout);
- ``decode``: one token of generation against a KV cache (objectives whose model generates:
  ``Objective.generates``).

Lowering runs the whole front end an accelerator would run -- tracing (inside
`jaxtune.utils.platform.lowering_for` those platforms, so attention and the quantized matmul take
their branches), the platform's branch of every `jax.lax.platform_dependent`, the Pallas kernels' Triton
and Mosaic lowering, sharding annotations -- so most errors a GPU or TPU would hit show up here
(what does not: the backend compiler's own limits, memory). A failure is a `LoweringError` naming
the program, the platform and the op. `Lowered.kernels` counts the custom calls of the lowered
module by kernel (``tpu_custom_call:nf4_matmul_tpu``, ``triton:nf4_matmul``), so a caller can check
which fused kernels a program really contains.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtune.job.objectives import get_objective
from jaxtune.job.plan import plan_step
from jaxtune.job.schema import TrainJobConfig
from jaxtune.models import Model
from jaxtune.parallel.mesh import BATCH_AXES
from jaxtune.parallel.rules import activation_mesh
from jaxtune.train.memory import sharded_train_step, with_shardings
from jaxtune.train.step import make_eval_step
from jaxtune.utils.partition import join
from jaxtune.utils.platform import lowering_for

PROGRAMS = ("train", "eval", "decode")
DECODE_SLOTS = 64  # KV cache slots of the decode program


class LoweringError(RuntimeError):
    """A program of a job did not lower for a platform (the message names both and the op)."""


@dataclass
class Lowered:
    program: str
    platform: str
    text: str = field(repr=False)
    kernels: Counter = field(default_factory=Counter)


def kernel_census(text: str) -> Counter:
    """Custom calls of a lowered (StableHLO) module, by kernel: Mosaic calls as
    ``tpu_custom_call:<kernel name>``, Triton calls as ``triton:<kernel name>``, others by target.
    Counted as written in the module: a kernel jitted once and called from several places (the
    quantized matmul of one shape and configuration, `jaxtune.quant.matmul`) counts once."""
    found: Counter = Counter()
    for line in text.splitlines():
        target = re.search(r"stablehlo\.custom_call @([\w$.]+)", line)
        if target is None:
            continue
        name = target.group(1)
        if name == "tpu_custom_call":
            kernel = re.search(r'kernel_name = "([^"]+)"|\\22kernel_name\\22: \\22([^\\]+)\\22', line)
            name += f":{next(g for g in kernel.groups() if g)}" if kernel else ""
        elif "triton" in name:
            kernel = re.search(r'name = "([^"]+)"', line)
            name = f"triton:{kernel.group(1)}" if kernel else name
        found[name] += 1
    return found


def _lower(jitted, args: tuple, program: str, platforms: tuple[str, ...]) -> list[Lowered]:
    """Trace once (every platform's branch staged out), lower for each platform."""
    out, platform = [], platforms[0]
    try:
        with lowering_for(*platforms):
            traced = jitted.trace(*args)
        for platform in platforms:
            text = traced.lower(lowering_platforms=(platform,)).as_text()
            out.append(Lowered(program, platform, text, kernel_census(text)))
    except Exception as err:  # noqa: BLE001 -- any failure is reported with what was being lowered
        raise LoweringError(f"{program} step for {platform}: {_failing_op(err)}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}") from err
    return out


def _failing_op(err: BaseException) -> str:
    """The op a lowering error came from, as far as the error says (a Pallas kernel's name, a primitive)."""
    text = str(err)
    for pattern in (r"kernel[ _]name[:= ]+['\"]?(\w+)", r"[Pp]rimitive:? ['\"]?([\w.]+)", r"in pallas_call (\w+)",
                    r"for (\w+_matmul\w*)", r"(splash|flash|mha|attention)\w*"):
        found = re.search(pattern, text)
        if found:
            return found.group(1)
    return "an op"


def lower_job(job: TrainJobConfig, platforms: tuple[str, ...] = ("cuda", "tpu"), *,
              programs: tuple[str, ...] = PROGRAMS, devices: Optional[int] = None) -> list[Lowered]:
    """The job's programs lowered for each platform (see the module docstring). Needs as many devices
    as the mesh (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)."""
    unknown = [p for p in programs if p not in PROGRAMS]
    if unknown:
        raise ValueError(f"lower_job: unknown programs {unknown} ({' | '.join(PROGRAMS)})")
    plan = plan_step(job, devices=devices)
    train_step, (state, frozen, batch) = sharded_train_step(plan)
    jobs: list[tuple[str, Any, tuple]] = [("train", train_step, (state, frozen, batch))] if "train" in programs else []
    shardings = lambda tree: jax.tree.map(lambda a: a.sharding, tree)  # noqa: E731
    params = join(state.params, frozen)
    params_sh = shardings(params)
    if "eval" in programs:
        step = make_eval_step(plan.loss_fn, mesh=plan.mesh, params_shardings=params_sh,
                              batch_shardings=NamedSharding(plan.mesh, P(BATCH_AXES)))
        jobs.append(("eval", step, (params, batch)))
    if "decode" in programs and get_objective(job.objective.kind).generates and plan.cfg.causal:
        jobs.append(("decode", *_decode_step(plan, params_sh, params)))
    return [lowered for program, fn, args in jobs for lowered in _lower(fn, args, program, tuple(platforms))]


def _decode_step(plan, params_sh, params) -> tuple[Any, tuple]:
    """One token for each of ``data x fsdp`` rows against a KV cache of `DECODE_SLOTS` slots."""
    mesh, model = plan.mesh, Model(plan.cfg)
    rows = plan.mesh_shape["data"] * plan.mesh_shape["fsdp"]
    rows_sh = NamedSharding(mesh, P(BATCH_AXES))
    cache = jax.eval_shape(lambda: model.init_cache(rows, DECODE_SLOTS))
    cache_sh = jax.tree.map(lambda a: rows_sh if a.ndim else NamedSharding(mesh, P()), cache)
    token = jax.ShapeDtypeStruct((rows, 1), jnp.int32, sharding=rows_sh)

    def decode(params, cache, token, position):
        with activation_mesh(mesh):
            logits, cache = model.apply(model.resolve_prefix(params), token, positions=position,
                                        segment_ids=jnp.ones_like(token), cache=cache)
            return logits[:, -1], cache

    jitted = jax.jit(decode, in_shardings=(params_sh, cache_sh, rows_sh, rows_sh), out_shardings=(rows_sh, cache_sh),
                     donate_argnums=(1,))
    return jitted, (params, with_shardings(cache, cache_sh), token, token)
