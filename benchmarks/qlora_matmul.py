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
import json
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jaxtune.kernels import tiles as tile_table
from jaxtune.kernels.quant_matmul import Tiles
from jaxtune.quant import QuantConfig, quantize_kernel
from jaxtune.quant.matmul import quant_lora_matmul
from jaxtune.quant.weight import with_kernel
from jaxtune.train.metrics import device_peak_flops

# HBM bandwidth per device (datasheets), bytes/s
HBM = [(r"H200", 4.8e12), (r"H100.*PCIe", 2.0e12), (r"H100.*NVL", 3.9e12), (r"H100", 3.35e12),
       (r"A100.*80", 2.039e12), (r"A100", 1.555e12), (r"L4", 0.3e12)]
DECODE, TRAIN = (1, 4, 16), (2048, 8192)
KN = ((4096, 4096), (4096, 14336), (14336, 4096))


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


def cases(m: int, k: int, n: int, rank: int, kind: str, impl: str):
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    w = (jax.random.normal(keys[1], (k, n)) * 0.02).astype(jnp.bfloat16)
    a = (jax.random.normal(keys[2], (k, rank)) * 0.02).astype(jnp.bfloat16)
    b = (jax.random.normal(keys[3], (rank, n)) * 0.02).astype(jnp.bfloat16)
    q = quantize_kernel(w, QuantConfig(kind=kind, double_quant=kind in ("nf4", "fp4")))
    dy = jax.random.normal(keys[4], (m, n), jnp.bfloat16)

    def quantized(path):
        qw = with_kernel(q, path)
        fwd = jax.jit(lambda x, a, b: quant_lora_matmul(x, x, qw, a, b, 2.0, "bfloat16", path))
        def fwd_bwd(x, a, b):  # the output and (dx, dA, dB): both passes run
            y, pullback = jax.vjp(lambda *t: quant_lora_matmul(t[0], t[0], qw, t[1], t[2], 2.0, "bfloat16", path), x, a, b)
            return y, pullback(dy)

        return fwd, jax.jit(fwd_bwd)

    def dense_fwd_bwd(x):
        y, pullback = jax.vjp(lambda t: t @ w, x)
        return y, pullback(dy)

    dense_fwd = jax.jit(lambda x: x @ w)
    dense_both = jax.jit(dense_fwd_bwd)
    return {"bf16 matmul": (dense_fwd, dense_both, (x,)),
            "XLA dequant+LoRA": (*quantized("xla"), (x, a, b)),
            "fused kernel": (*quantized(impl), (x, a, b))}, q


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
            for name, (fwd, both, inputs) in impls.items():
                lora = 0 if name == "bf16 matmul" else 2 * m * args.rank * (k + n)
                for label, fn, mult in (("fwd", fwd, 1), ("fwd+bwd", both, 2)):
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
    from jaxtune.kernels.quant_matmul import forward
    from jaxtune.quant.matmul import code_table, kernel_scales

    for k, n in KN:
        for m in tuple(DECODE) + tuple(TRAIN):
            impls, q = cases(m, k, n, args.rank, args.kind, "pallas")
            xla = median_seconds(lambda: impls["XLA dequant+LoRA"][0](*impls["XLA dequant+LoRA"][2]), args.repeats)
            x = impls["fused kernel"][2][0]
            candidates = ([Tiles(bm=16, bn=bn, bk=64, splits=s, num_warps=4, num_stages=st)
                           for bn in (32, 64, 128) for s in (1, 2, 4, 8, 16) for st in (3, 4)] if m <= 16 else
                          [Tiles(bm=bm, bn=bn, bk=64, num_warps=wp, num_stages=st)
                           for bm in (64, 128) for bn in (64, 128, 256) for wp in (4, 8) for st in (3, 4)])
            best = None
            for t in candidates:
                try:
                    fn = jax.jit(lambda x, t=t: forward(x, q.codes, kernel_scales(q), kind=q.kind,
                                                        table=code_table(q.kind), blocksize=q.blocksize,
                                                        n=n, tiles=t))
                    s = median_seconds(lambda: fn(x), args.repeats)
                except Exception as err:  # a candidate the hardware cannot hold (shared memory, registers)
                    print(f"  skip {t}: {type(err).__name__}", file=sys.stderr)
                    continue
                if best is None or s < best[0]:
                    best = (s, t)
            entry = "xla" if best is None or best[0] > xla else {f: getattr(best[1], f) for f in
                                                               ("bm", "bn", "bk", "splits", "num_warps", "num_stages")}
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
