"""`jaxtune.utils.platform`: a trace takes the host's branch, or stages out those of `lowering_for`,
and the program lowered for a platform runs that platform's branch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxtune.utils.platform import canonical, lowering_for, per_platform, target_platforms, traced_for


def _branches(traced: list):
    def make(platform, offset):
        def branch(x):
            traced.append(platform)
            return x + offset
        return branch

    return {"cpu": make("cpu", 1.0), "cuda": make("cuda", 2.0), "tpu": make("tpu", 3.0)}


def test_a_trace_takes_the_hosts_branch_only():
    traced: list = []
    out = jax.jit(lambda x: per_platform(_branches(traced), x))(jnp.zeros(()))
    assert traced == ["cpu"] and float(out) == 1.0
    assert target_platforms() == ("cpu",)


def test_lowering_for_stages_out_each_named_platform_and_lowering_keeps_one():
    traced: list = []
    with lowering_for("cpu", "gpu", "tpu"):
        assert target_platforms() == ("cpu", "cuda", "tpu")
        program = jax.jit(lambda x: per_platform(_branches(traced), x)).trace(jnp.zeros(()))
    assert sorted(traced) == ["cpu", "cuda", "tpu"]
    for platform in ("cuda", "tpu"):
        program.lower(lowering_platforms=(platform,))  # each platform's branch lowers
    assert float(program.lower(lowering_platforms=("cpu",)).compile()(jnp.zeros(()))) == 1.0
    traced.clear()
    with traced_for("tpu"):  # one platform: its branch, nothing staged out
        jax.jit(lambda x: per_platform(_branches(traced), x)).trace(jnp.zeros(()))
    assert traced == ["tpu"]


def test_bad_names_are_refused():
    assert canonical("GPU") == "cuda"
    with pytest.raises(ValueError, match="rocm"):
        canonical("rocm")
    with pytest.raises(ValueError, match="no branch for tpu"):
        per_platform({"cpu": abs, "cuda": abs}, 1.0)
    with pytest.raises(ValueError, match="at least one platform"):
        with lowering_for():
            pass
