"""Exact checksums of array pytrees, computed where the arrays live (any device, any sharding).

Each leaf's bits are read as unsigned integers and summed with position-dependent odd multipliers
in uint32 arithmetic, twice with different multipliers (64 bits per leaf). Integer sums wrap and
are associative, so the result is the same for any reduction order, device count or sharding: a
checkpoint saved on 8 devices verifies on 1. Trees up to HOST_BYTES that this process holds whole
are summed by numpy with the same arithmetic (no program to compile). It detects changed bits (a flipped byte changes
the sum unless the change is a multiple of 2**32 in both sums); it is not a cryptographic hash.

    leaf_checksums(tree) -> {"path/to/leaf": "dtype:hex16", ...}
    digest(checksums)    -> one hex16 string for a whole tree (order-independent of dict order)
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.utils.tree import keypath_str

_MULTIPLIERS = (np.uint32(0x9E3779B1), np.uint32(0x85EBCA77))
_OFFSETS = (np.uint32(0x7F4A7C15), np.uint32(0x165667B1))


def _as_words(x: jax.Array) -> jax.Array:
    """The leaf's bits as uint32 words (one per element)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
    if bits is None:
        raise TypeError(f"cannot checksum a {x.dtype} leaf")
    return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)


def _position(shape: tuple[int, ...]) -> jax.Array:
    """Each element's flat index (mod 2**32), built from iotas so it shards like the leaf."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _leaf_sums(x: jax.Array) -> jax.Array:
    words = _as_words(x)
    position = _position(words.shape)
    sums = []
    for multiplier, offset in zip(_MULTIPLIERS, _OFFSETS):
        mix = (position * multiplier + offset) | np.uint32(1)  # odd: every bit of the word matters
        sums.append(jnp.sum(words * mix, dtype=jnp.uint32))
    return jnp.stack(sums)


@jax.jit
def _tree_sums(leaves: list) -> list:
    """One program for the whole tree (one dispatch; under a mesh its reductions run together,
    never as a queue of small collective programs)."""
    return [_leaf_sums(x) for x in leaves]


def _is_array(x: Any) -> bool:
    return hasattr(x, "dtype") and hasattr(x, "shape")


HOST_BYTES = 64 * 2**20  # trees up to this size are summed on the host (no program to compile)


def _host_sums(x: Any) -> np.ndarray:
    """`_leaf_sums` in numpy (the same uint32 arithmetic, so the same result) for a small leaf."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    a = np.asarray(x)
    words = a.astype(np.uint32) if a.dtype == np.bool_ else \
        a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize]).astype(np.uint32)
    position = np.arange(words.size, dtype=np.uint32)
    with np.errstate(over="ignore"):
        return np.array([np.sum(words.reshape(-1) * ((position * m + o) | np.uint32(1)), dtype=np.uint32)
                         for m, o in zip(_MULTIPLIERS, _OFFSETS)], np.uint32)


def _addressable(x: Any) -> bool:
    return getattr(x, "is_fully_addressable", True)


def leaf_checksums(tree: Any) -> dict[str, str]:
    """{leaf path: "dtype:checksum"} for every array leaf of ``tree`` (None leaves skipped). A small
    tree that this process holds whole is summed on the host; any other in one device program."""
    pairs = [(keypath_str(path), x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0] if _is_array(x)]
    if not pairs:
        return {}
    nbytes = sum(int(np.prod(x.shape)) * _itemsize(x) for _, x in pairs)
    if nbytes <= HOST_BYTES and all(_addressable(x) for _, x in pairs):
        sums = [_host_sums(x) for _, x in pairs]
    else:
        sums = jax.device_get(_tree_sums([_in_device_memory(x) for _, x in pairs]))
    return {path: f"{_dtype_name(x)}:{int(s[0]):08x}{int(s[1]):08x}" for (path, x), s in zip(pairs, sums)}


def _itemsize(x: Any) -> int:
    return 8 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else np.dtype(x.dtype).itemsize


def _in_device_memory(x: Any) -> jax.Array:
    """Arrays offloaded to host memory (train.offload_optimizer) are read on the device they belong to."""
    sharding = getattr(x, "sharding", None)
    kind = getattr(sharding, "memory_kind", None)
    if kind is not None and kind != "device":
        return jax.device_put(x, sharding.with_memory_kind("device"))
    return jnp.asarray(x)


def _dtype_name(x: Any) -> str:
    dtype = x.dtype
    return "key" if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else np.dtype(dtype).name


def digest(checksums: dict[str, str]) -> str:
    """One 16-hex-digit digest of a whole tree's checksums."""
    text = "\n".join(f"{k}={v}" for k, v in sorted(checksums.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def mismatches(recorded: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Paths whose checksum differs (leaves whose dtype changed, i.e. were cast on restore, are
    not compared; a leaf missing on either side is a mismatch)."""
    bad = []
    for path in sorted(set(recorded) | set(actual)):
        old, new = recorded.get(path), actual.get(path)
        if old is None or new is None:
            bad.append(path)
        elif old.split(":")[0] == new.split(":")[0] and old != new:
            bad.append(path)
    return bad
