"""Choosing code by the platform a program is lowered for.

A jitted program is traced once and lowered for a platform: the host's (``jax.jit(f)(x)``) or others
(``jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))``, `jax.export`), so a CPU machine can
lower a TPU or GPU program. `per_platform(branches, *args)` calls the branch of the platform the
program will be lowered for; when it may be lowered for several, it stages them all out with
`jax.lax.platform_dependent` and lowering keeps the one it lowers for.

Which platforms: the host's (``jax.default_backend()``; NVIDIA GPUs are ``cuda``, an unknown backend
takes the ``cpu`` branch) unless the trace runs inside `lowering_for(*platforms)`. Staging every
platform out by default would make every trace pay for kernels it never lowers: a QLoRA layer's
Triton and Mosaic kernels, forward and backward, made a small model's CPU trace 4.5x longer
(1.8 s -> 8.4 s). `jaxtune.job.lowering` (``jaxtune estimate --lower``) sets it; so can anyone who
lowers for another platform: ``with lowering_for("tpu"): traced = jax.jit(step).trace(...)``.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Mapping, Optional

import jax

PLATFORMS = ("cpu", "cuda", "tpu")
_targets: contextvars.ContextVar[Optional[tuple[str, ...]]] = contextvars.ContextVar("lowering_for", default=None)


def canonical(platform: str) -> str:
    """``jax.default_backend()`` names NVIDIA GPUs ``gpu``; lowering names them ``cuda``."""
    platform = {"gpu": "cuda"}.get(platform.lower(), platform.lower())
    if platform not in PLATFORMS:
        raise ValueError(f"platform {platform!r}: jaxtune chooses implementations for {' | '.join(PLATFORMS)}")
    return platform


@contextlib.contextmanager
def lowering_for(*platforms: str) -> Iterator[None]:
    """Programs traced within the block may be lowered for ``platforms`` (cpu | cuda | gpu | tpu):
    `per_platform` stages out each one's branch (one platform: calls its branch directly)."""
    if not platforms:
        raise ValueError("lowering_for: name at least one platform (cpu | cuda | tpu)")
    token = _targets.set(tuple(dict.fromkeys(canonical(p) for p in platforms)))
    try:
        yield
    finally:
        _targets.reset(token)


def traced_for(platform: str) -> contextlib.AbstractContextManager:
    """`lowering_for` one platform: analyses of the traced program (the memory estimator's
    residuals) see that platform's implementation only."""
    return lowering_for(platform)


def host_platform() -> str:
    backend = jax.default_backend().lower()
    return {"gpu": "cuda"}.get(backend, backend) if backend in ("cpu", "gpu", "cuda", "tpu") else "cpu"


def target_platforms() -> tuple[str, ...]:
    """The platforms a program traced now may be lowered for (`lowering_for`, else the host's)."""
    return _targets.get() or (host_platform(),)


def per_platform(branches: Mapping[str, Callable[..., Any]], *args: Any) -> Any:
    """``branches[p](*args)`` for the platform ``p`` the program is lowered for (a branch for each
    of `PLATFORMS`). The same function for every target platform is called directly."""
    missing = [p for p in PLATFORMS if p not in branches]
    if missing:
        raise ValueError(f"per_platform: no branch for {', '.join(missing)}")
    targets = target_platforms()
    if len({id(branches[p]) for p in targets}) == 1:
        return branches[targets[0]](*args)
    return jax.lax.platform_dependent(*args, **{p: branches[p] for p in targets}, default=branches[targets[0]])
