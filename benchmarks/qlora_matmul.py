"""The fused NF4 (+ LoRA) matmul kernel against bf16 matmul and XLA's dequantize-then-matmul, on GPU.

    python benchmarks/qlora_matmul.py [--kind nf4] [--rank 16] [--repeats 20] [--shapes decode,train]
    python benchmarks/qlora_matmul.py --autotune     # time tile candidates, write jaxtune/kernels/tiles.json
    python benchmarks/qlora_matmul.py --interpret    # the same table in Pallas' interpreter (any machine; slow, tiny shapes)

For decode shapes (M = 1, 4, 16) and training shapes (M = 2048, 8192) with (K, N) = (4096, 4096),
(4096, 14336), (14336, 4096) it prints, forward and forward+backward (dx, dA, dB), the time, TFLOP/s
and GB/s of (a) the bf16 matmul ``x @ W``, (b) XLA dequantize-then-matmul + LoRA, (c) the fused
kernel, with each row's roofline floor (max of FLOPs / peak and bytes / HBM bandwidth, from the
device's datasheet) and the kernel's distance from it. Without a GPU (and without --interpret) it
says so and exits 0. Timings: median of --repeats calls after a warm-up, each call blocked on.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jaxtune.kernels import tiles as tile_table
from jaxtune.kernels.quant_matmul import Tiles, forward
from jaxtune.quant import QuantConfig, quantize_kernel
from jaxtune.quant.matmul import code_table, kernel_scales, quant_lora_matmul
from jaxtune.train.metrics import device_peak_flops

# HBM bandwidth per device (datasheets), bytes/s
HBM = [(r"H200", 4.8e12), (r"H100.*PCIe", 2.0e12), (r"H100.*NVL", 3.9e12), (r"H100", 3.35e12),
       (r"A100.*80", 2.039e12), (r"A100", 1.555e12), (r"L4", 0.3e12)]
DECODE, TRAIN = (1, 4, 16), (2048, 8192)
KN = ((4096, 4096), (4096, 14336), (14336, 4096))
TILE_FIELDS = ("bm", "bn", "bk", "splits", "num_warps", "num_stages")


def bandwidth(kind: str) -> float | None:
    return next((bw for pattern, bw in HBM if re.search(pattern, kind, re.IGNORECASE)), None)


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def weights(k: int, n: int, rank: int, kind: str):
    """-> (w: bf16 [k, n], a: [k, rank], b: [rank, n], q: w quantized as ``kind``), the same for every M."""
    keys = jax.random.split(jax.random.key(0), 5)
    w = (jax.random.normal(keys[1], (k, n)) * 0.02).astype(jnp.bfloat16)
    a = (jax.random.normal(keys[2], (k, rank)) * 0.02).astype(jnp.bfloat16)
    b = (jax.random.normal(keys[3], (rank, n)) * 0.02).astype(jnp.bfloat16)
    q = quantize_kernel(w, QuantConfig(kind=kind, double_quant=kind in ("nf4", "fp4")))
    return w, a, b, q


def activations(m: int, k: int, n: int):
    """-> (x: bf16 [m, k], dy: bf16 [m, n], the output's cotangent)."""
    keys = jax.random.split(jax.random.key(0), 5)
    return jax.random.normal(keys[0], (m, k), jnp.bfloat16), jax.random.normal(keys[4], (m, n), jnp.bfloat16)


@jax.jit
def dense_fwd(x, w):
    return x @ w


@jax.jit
def dense_fwd_bwd(x, w, dy):  # the output and dx: both passes run
    y, pullback = jax.vjp(lambda x: x @ w, x)
    return y, pullback(dy)


@functools.cache
def quantized(impl: str):
    """-> jitted (forward(x, q, a, b), forward+backward(x, q, a, b, dy) -> (y, (dx, dA, dB))) of
    `quant_lora_matmul` on path ``impl`` (bf16 compute, LoRA scale 2.0, x the LoRA input too)."""

    def fwd(x, q, a, b):
        return quant_lora_matmul(x, x, q, a, b, 2.0, "bfloat16", impl)

    def fwd_bwd(x, q, a, b, dy):  # the output and (dx, dA, dB): both passes run
        y, pullback = jax.vjp(lambda x, a, b: fwd(x, q, a, b), x, a, b)
        return y, pullback(dy)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def cases(m: int, k: int, n: int, rank: int, kind: str, impl: str, made=None):
    """-> ({what: {"fwd": (fn, arguments), "fwd+bwd": (fn, arguments)}}, q) for the bf16 matmul, XLA
    dequantize + LoRA and the fused kernel (path ``impl``) + LoRA. Every array is a jit argument: closed
    over, jit would embed the weights as constants (at 4096 x 14336 a 235 MB program, seconds of compile
    per function). ``made``: ``weights(k, n, rank, kind)`` made before (weights shared by several M)."""
    w, a, b, q = made if made is not None else weights(k, n, rank, kind)
    x, dy = activations(m, k, n)
    (xla_fwd, xla_both), (fused_fwd, fused_both) = quantized("xla"), quantized(impl)
    return {"bf16 matmul": {"fwd": (dense_fwd, (x, w)), "fwd+bwd": (dense_fwd_bwd, (x, w, dy))},
            "XLA dequant+LoRA": {"fwd": (xla_fwd, (x, q, a, b)), "fwd+bwd": (xla_both, (x, q, a, b, dy))},
            "fused kernel": {"fwd": (fused_fwd, (x, q, a, b)), "fwd+bwd": (fused_both, (x, q, a, b, dy))}}, q


def tile_forward(q, n: int, tiles: Tiles, interpret: bool = False):
    """The fused kernel without LoRA at ``tiles``, jitted over (x, codes, scales) (the weights as arguments)."""
    return jax.jit(lambda x, codes, scales: forward(x, codes, scales, kind=q.kind, table=code_table(q.kind),
                                                    blocksize=q.blocksize, n=n, tiles=tiles, interpret=interpret))


def time_tiles(x, q, n: int, candidates, repeats: int, interpret: bool = False, stop=lambda best: False):
    """Time the kernel without LoRA at each candidate -> (best (seconds, tiles) or None, failures
    [(tiles, error)]: candidates the hardware cannot hold, shared memory or registers). ``stop(best)``:
    checked before each candidate, True ends the search."""
    codes, scales = q.codes, kernel_scales(q)
    best, failed = None, []
    for t in candidates:
        if stop(best):
            break
        try:
            fn = tile_forward(q, n, t, interpret)
            s = median_seconds(lambda: fn(x, codes, scales), repeats)
        except Exception as err:
            failed.append((t, err))
            continue
        if best is None or s < best[0]:
            best = (s, t)
    return best, failed


def table_entry(best, xla_seconds: float):
    """The tile table's entry: the best tiles' fields, or "xla" where no candidate beat XLA."""
    return "xla" if best is None or best[0] > xla_seconds else {f: getattr(best[1], f) for f in TILE_FIELDS}


def run_table(args, impl: str):
    device = jax.devices()[0]
    peak = device_peak_flops(device.device_kind, "bfloat16")
    bw = bandwidth(device.device_kind)
    ms = (1, 4) if args.interpret else tuple(DECODE) + tuple(TRAIN)
    shapes = ((256, 256),) if args.interpret else KN
    known = lambda v, unit: "unknown" if v is None else f"{v / unit:.0f}"  # noqa: E731
    print(f"{device.device_kind}: peak bf16 {known(peak, 1e12)} TFLOP/s, HBM {known(bw, 1e9)} GB/s, "
          f"{args.kind}, LoRA rank {args.rank}, median of {args.repeats}")
    print(f"{'M':>5s} {'K':>6s} {'N':>6s} {'what':18s} {'pass':8s} {'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>8s} "
          f"{'floor ms':>9s} {'x floor':>8s}")
    for k, n in shapes:
        for m in ms:
            impls, q = cases(m, k, n, args.rank, args.kind, impl)
            w_bytes = {"bf16 matmul": 2 * k * n, "XLA dequant+LoRA": q.nbytes, "fused kernel": q.nbytes}
            for name, passes in impls.items():
                lora = 0 if name == "bf16 matmul" else 2 * m * args.rank * (k + n)
                for label, mult in (("fwd", 1), ("fwd+bwd", 2)):
                    fn, inputs = passes[label]
                    seconds = median_seconds(lambda: fn(*inputs), args.repeats)
                    flops = mult * (2 * m * k * n + lora)
                    moved = mult * w_bytes[name] + 2 * (m * k + m * n) * (1 if mult == 1 else 2)
                    floor = max(flops / peak if peak else 0.0, moved / bw if bw else 0.0)
                    print(f"{m:5d} {k:6d} {n:6d} {name:18s} {label:8s} {seconds * 1e3:9.3f} {flops / seconds / 1e12:8.2f} "
                          f"{moved / seconds / 1e9:8.1f} {floor * 1e3:9.3f} {seconds / floor if floor else float('nan'):8.2f}",
                          flush=True)


def autotune(args):
    """Time a few tile candidates per shape on this GPU; keep the best, or "xla" where XLA wins."""
    device = jax.devices()[0]
    table = json.loads(tile_table.TABLE.read_text()) if tile_table.TABLE.exists() else {}

    for k, n in KN:
        for m in tuple(DECODE) + tuple(TRAIN):
            impls, q = cases(m, k, n, args.rank, args.kind, "pallas")
            xla_fn, xla_inputs = impls["XLA dequant+LoRA"]["fwd"]
            xla = median_seconds(lambda: xla_fn(*xla_inputs), args.repeats)
            x = xla_inputs[0]
            candidates = ([Tiles(bm=16, bn=bn, bk=64, splits=s, num_warps=4, num_stages=st)
                           for bn in (32, 64, 128) for s in (1, 2, 4, 8, 16) for st in (3, 4)] if m <= 16 else
                          [Tiles(bm=bm, bn=bn, bk=64, num_warps=wp, num_stages=st)
                           for bm in (64, 128) for bn in (64, 128, 256) for wp in (4, 8) for st in (3, 4)])
            best, failed = time_tiles(x, q, n, candidates, args.repeats)
            for t, err in failed:
                print(f"  skip {t}: {type(err).__name__}", file=sys.stderr)
            entry = table_entry(best, xla)
            table[tile_table.key(device.device_kind, args.kind, m, n, k)] = entry
            print(f"M={m} K={k} N={n}: xla {xla * 1e3:.3f} ms, best {best and best[0] * 1e3:.3f} ms -> {entry}")
    tile_table.TABLE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {tile_table.TABLE}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="nf4", choices=["nf4", "fp4", "int4", "int8"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--autotune", action="store_true")
    parser.add_argument("--interpret", action="store_true", help="run the kernels in Pallas' interpreter (no GPU)")
    args = parser.parse_args()
    if jax.default_backend() != "gpu" and not args.interpret:
        print(f"no GPU present (backend: {jax.default_backend()}): the fused-kernel table needs one. On a GPU VM run "
              "`python benchmarks/qlora_matmul.py`; here `--interpret` runs a tiny version in Pallas' interpreter.")
        return 0
    if args.autotune:
        autotune(args)
        return 0
    run_table(args, "interpret" if args.interpret else "pallas")
    return 0


if __name__ == "__main__":
    sys.exit(main())
