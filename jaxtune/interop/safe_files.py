"""Reading safetensors files that came from elsewhere: every failure is one line naming the file.

`read_tensor` / `read_all` open a file with ``safetensors`` (numpy, never pickle) and turn a
malformed or truncated file into a ``ValueError`` that names it, and refuse a floating-point
tensor holding NaN or inf, naming file and tensor. `inside_directory` checks that a file a
checkpoint names (a shard of an index, a symlink) lies inside the checkpoint's directory.
This module reads files; it knows nothing of model layouts or tensor names.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors import SafetensorError, safe_open

_FINITE_CHUNK = 1 << 24  # elements checked per isfinite call (bounds the temporary bool array)


@contextmanager
def open_safetensors(path: str | os.PathLike) -> Iterator:
    """``safe_open(path)`` whose header / data errors become one ``ValueError`` naming ``path``."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            yield handle
    except SafetensorError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: not a readable safetensors file ({reason}); truncated or corrupt? "
                         "download or export it again") from None


def check_finite(array: np.ndarray, name: str, path: str | os.PathLike) -> np.ndarray:
    """``array`` unchanged, or a ``ValueError`` if a floating-point tensor holds NaN or inf."""
    if array.dtype.kind in "fc" or "float" in array.dtype.name:
        flat = array.reshape(-1)
        for start in range(0, flat.size, _FINITE_CHUNK):
            if not np.isfinite(flat[start:start + _FINITE_CHUNK]).all():
                raise ValueError(f"{path}: tensor {name} holds NaN or inf (a diverged or corrupt checkpoint)")
    return array


def read_tensor(path: str | os.PathLike, name: str) -> np.ndarray:
    """One tensor of a safetensors file, checked to be finite."""
    with open_safetensors(path) as handle:
        return check_finite(handle.get_tensor(name), name, path)


def read_all(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, each checked to be finite."""
    with open_safetensors(path) as handle:
        return {name: check_finite(handle.get_tensor(name), name, path) for name in handle.keys()}


def tensor_names(path: str | os.PathLike) -> list[str]:
    with open_safetensors(path) as handle:
        return list(handle.keys())


def inside_directory(directory: Path, path: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside ``directory``. A Hugging Face hub cache
    snapshot (``.../snapshots/REV/``) links its files into the repository's ``blobs/``: that
    folder counts as inside too."""
    root = directory.resolve()
    target = path.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    return any(target == a or a in target.parents for a in allowed)
