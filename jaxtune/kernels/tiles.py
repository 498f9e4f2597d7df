"""Tile sizes for the fused quantized matmul, per shape: a measured table, else a heuristic.

`choose(m, n, k, kind, blocksize)` returns the `Tiles` of one call, or None where XLA's
dequantize-then-matmul is faster (a measured entry says so); `measured` gives this device's entry
for a shape, if any (``quant.kernel=auto`` follows it on a GPU; unmeasured shapes go by their rows,
`jaxtune.quant.matmul.KERNEL_ROWS`). Measured entries live in
``tiles.json`` beside this file, written (`write`) by ``python benchmarks/qlora_matmul.py --autotune`` or
``benchmarks/accelerator_suite.py`` on a GPU: ``{"<device kind>|<kind>|<m bucket>|<n>|<k>": {"bm": .., "bn": .., "bk": .., "splits": ..,
"num_warps": .., "num_stages": ..} or "xla"}``. Without an entry:

- decode (``m <= 16``): one 16-row tile, ``bn = 64``, split-K so that ``n/bn * splits`` programs
  (about 4 per SM of an H100) stream the weight, each over whole absmax blocks;
- otherwise ``bm = 64`` (``m < 256``) or 128, ``bn = 128``, ``bk = 64`` (or the blocksize if smaller).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Optional

from jaxtune.kernels.quant_matmul import Tiles

TABLE = Path(__file__).with_name("tiles.json")
_PROGRAMS = 4 * 132  # about 4 programs per SM of an H100 SXM (132 SMs)


def m_bucket(m: int) -> int:
    """Rows rounded up to a power of two (table keys)."""
    return 1 << max(0, (m - 1).bit_length())


@lru_cache(maxsize=None)
def _measured() -> dict:
    return json.loads(TABLE.read_text()) if TABLE.exists() else {}


def key(device_kind: str, kind: str, m: int, n: int, k: int) -> str:
    return f"{device_kind}|{kind}|{m_bucket(m)}|{n}|{k}"


def write(entries: dict, path: Optional[Path] = None) -> Path:
    """Merge ``entries`` (`key` -> `Tiles`, a dict of its fields, or "xla") into the table at ``path``
    (default: `TABLE`, the one `choose` reads), in the format ``benchmarks/qlora_matmul.py
    --autotune`` writes; the next lookup re-reads the table. -> the path written."""
    path = TABLE if path is None else Path(path)
    table = json.loads(path.read_text()) if path.exists() else {}
    fields = ("bm", "bn", "bk", "splits", "num_warps", "num_stages")
    for name, entry in entries.items():
        if isinstance(entry, Tiles):
            entry = {f: getattr(entry, f) for f in fields}
        if entry != "xla" and not (isinstance(entry, dict) and set(entry) <= set(fields)):
            raise ValueError(f"tile table: entry {name!r} must be Tiles, their fields or 'xla', got {entry!r}")
        table[name] = entry
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    _measured.cache_clear()
    return path


def measured(m: int, n: int, k: int, kind: str, device_kind: str) -> Optional[object]:
    """The table's entry for this device and shape: `Tiles` (the kernel won), "xla", or None."""
    entry = _measured().get(key(device_kind, kind, m, n, k))
    return Tiles(**entry) if isinstance(entry, dict) else entry


def choose(m: int, n: int, k: int, kind: str, blocksize: int, device_kind: str = "") -> Optional[Tiles]:
    entry = measured(m, n, k, kind, device_kind)
    if entry == "xla":
        return None
    if isinstance(entry, Tiles):
        return entry
    group = k if kind == "int8" else blocksize
    bk = min(64, group)
    if m <= 16:
        bn = 64
        blocks = max(1, k // max(group, bk))  # whole absmax blocks per split
        splits = 1
        while splits * 2 <= blocks and blocks % (splits * 2) == 0 and -(-n // bn) * splits < _PROGRAMS:
            splits *= 2
        return Tiles(bm=16, bn=bn, bk=min(128, group) if kind != "int8" else 128, splits=splits, num_warps=4,
                     num_stages=4)
    return Tiles(bm=64 if m < 256 else 128, bn=128, bk=bk, splits=1, num_warps=4 if m < 256 else 8, num_stages=3)
