"""Choosing code by the platform a program is lowered for, not the machine it is traced on.

A jitted program traced on a CPU host can be lowered for ``cuda`` or ``tpu``
(``jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))``, `jax.export`), and one traced on a
GPU host can be exported for several platforms. Code that picks a kernel by
``jax.default_backend()`` picks the host's. `per_platform(branches, *args)` instead stages out
every platform's branch with `jax.lax.platform_dependent`, and lowering keeps the one for the
platform it lowers for; inside `traced_for(platform)` it calls that platform's branch directly
(analyses of the traced program, such as the memory estimator's residuals, and cross-lowering
tests that want one branch only).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Mapping, Optional

import jax

PLATFORMS = ("cpu", "cuda", "tpu")
_platform: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("traced_for_platform", default=None)


def canonical(platform: str) -> str:
    """``jax.default_backend()`` names NVIDIA GPUs ``gpu``; lowering names them ``cuda``."""
    platform = {"gpu": "cuda"}.get(platform.lower(), platform.lower())
    if platform not in PLATFORMS:
        raise ValueError(f"platform {platform!r}: jaxtune chooses implementations for {' | '.join(PLATFORMS)}")
    return platform


@contextlib.contextmanager
def traced_for(platform: str) -> Iterator[None]:
    """Within the block, `per_platform` calls ``platform``'s branch only (cpu | cuda | gpu | tpu)."""
    token = _platform.set(canonical(platform))
    try:
        yield
    finally:
        _platform.reset(token)


def traced_platform() -> Optional[str]:
    """The platform of the enclosing `traced_for`, or None (every platform's branch is staged out)."""
    return _platform.get()


def target_platforms() -> tuple[str, ...]:
    """The platforms a program traced now may be lowered for: the `traced_for` platform, else all."""
    chosen = _platform.get()
    return PLATFORMS if chosen is None else (chosen,)


def per_platform(branches: Mapping[str, Callable[..., Any]], *args: Any) -> Any:
    """``branches[p](*args)`` for the platform ``p`` the program is lowered for (a branch per
    platform in `PLATFORMS`; ``cpu``'s also serves any other). One function for all platforms is
    called directly, staging nothing out."""
    missing = [p for p in PLATFORMS if p not in branches]
    if missing:
        raise ValueError(f"per_platform: no branch for {', '.join(missing)}")
    chosen = _platform.get()
    if chosen is not None:
        return branches[chosen](*args)
    if len({id(branches[p]) for p in PLATFORMS}) == 1:
        return branches["cpu"](*args)
    return jax.lax.platform_dependent(*args, cpu=branches["cpu"], cuda=branches["cuda"], tpu=branches["tpu"],
                                      default=branches["cpu"])
