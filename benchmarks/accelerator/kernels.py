"""Sections 1-3: the fused quantized matmul kernel's correctness against XLA, its timing at Llama-8B
projection shapes, and the tile table (a reduced autotune). The cases (weights, inputs, jitted
functions) and the tile search are benchmarks/qlora_matmul.py's."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxtune.kernels import tiles as table
from jaxtune.kernels.quant_matmul import Tiles
from jaxtune.train.metrics import device_peak_flops

import qlora_matmul as qm  # benchmarks/qlora_matmul.py
from accelerator.record import Section, error_text, write_atomic

KINDS = ("nf4", "fp4", "int4", "int8")
CORRECTNESS_REL, CORRECTNESS_L2 = 2e-2, 1e-2
XLA, FUSED, DENSE = "XLA dequant+LoRA", "fused kernel", "bf16 matmul"  # qm.cases' keys


def weights(suite, k: int, n: int, kind: str):
    """qlora_matmul's ``weights(k, n, rank, kind)``, made once per shape for the run (``suite.ctx``)."""
    cache = suite.ctx.setdefault("weights", {})
    key = (k, n, suite.sizes.rank, kind)
    if key not in cache:
        cache[key] = qm.weights(k, n, suite.sizes.rank, kind)
    return cache[key]


def cases(suite, m: int, k: int, n: int, kind: str, impl: str):
    """qlora_matmul's ``cases`` on this run's weights: ({what: {pass: (fn, arguments)}}, q)."""
    return qm.cases(m, k, n, suite.sizes.rank, kind, impl, made=weights(suite, k, n, kind))


def _f32(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(jnp.float32))


def _errors(ref, got) -> dict:
    """max abs error, that over the reference's largest magnitude, relative L2 error, finiteness."""
    r, g = _f32(ref), _f32(got)
    diff = np.abs(r - g)
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    norm = float(np.linalg.norm(r))
    return {"abs": float(np.max(diff)) if diff.size else 0.0,
            "rel": float(np.max(diff)) / scale if scale > 0 else float(np.max(diff)),
            "l2": float(np.linalg.norm(r - g)) / norm if norm > 0 else float(np.linalg.norm(r - g)),
            "finite": bool(np.all(np.isfinite(g)))}


# --- 1. kernel correctness -------------------------------------------------------------------------

def kernel_correctness(sec: Section, suite) -> None:
    impl = "interpret" if suite.smoke else "pallas"
    sec.record["summary"].update(impl=impl, rank=suite.sizes.rank, tolerance={"rel": CORRECTNESS_REL, "l2": CORRECTNESS_L2})
    for m, k, n in suite.sizes.correctness:
        for kind in KINDS:
            row = {"kind": kind, "M": m, "K": k, "N": n}
            if sec.out_of_time():
                sec.skip(row)
                continue
            suite.log(f"  correctness {kind} M={m} K={k} N={n}")
            try:
                impls, _ = cases(suite, m, k, n, kind, impl)
                (want_fn, want_in), (got_fn, got_in) = impls[XLA]["fwd+bwd"], impls[FUSED]["fwd+bwd"]
                want, got = want_fn(*want_in), got_fn(*got_in)  # (y, (dx, dA, dB))
                ok = True
                for name, r, g in zip(("y", "dx", "dA", "dB"), (want[0], *want[1]), (got[0], *got[1])):
                    e = _errors(r, g)
                    row[f"{name}_abs"], row[f"{name}_rel"], row[f"{name}_l2"] = e["abs"], e["rel"], e["l2"]
                    ok &= e["finite"] and e["rel"] <= CORRECTNESS_REL and e["l2"] <= CORRECTNESS_L2
                row["pass"] = bool(ok)
            except Exception as err:
                row["error"] = error_text(err)
                row["pass"] = False
            sec.add(row)
    rows = [r for r in sec.record["rows"] if "pass" in r]
    if rows:
        sec.goal("fused kernel vs XLA, nf4/fp4/int4/int8", "forward, dx, dA, dB within tolerance",
                 f"{sum(r['pass'] for r in rows)}/{len(rows)} cases pass", all(r["pass"] for r in rows))


# --- 2. kernel timing ------------------------------------------------------------------------------

def kernel_timing(sec: Section, suite) -> None:
    impl = "interpret" if suite.smoke else "pallas"
    rank = suite.sizes.rank
    peak = device_peak_flops(suite.device_kind, "bfloat16")
    bw = qm.bandwidth(suite.device_kind)
    sec.record["summary"].update(impl=impl, rank=rank, peak_flops=peak, hbm_bytes_per_s=bw,
                                 lora="the quantized rows include the LoRA term (rank above); the dense row does not",
                                 tiles="fused rows use the tile table's entries where present, else the heuristic")
    xla_seconds = suite.ctx.setdefault("xla_nf4_seconds", {})
    for m in suite.sizes.timing_ms:
        for k, n in suite.sizes.timing_kn:
            row = {"M": m, "K": k, "N": n}
            if sec.out_of_time():
                sec.skip(row)
                continue
            repeats = suite.sizes.repeats(m)
            suite.log(f"  timing M={m} K={k} N={n} ({repeats} repeats)")
            errors = []

            def timed(key, fn, inputs):
                try:
                    row[key] = qm.median_seconds(lambda: fn(*inputs), repeats) * 1e3
                except Exception as err:
                    errors.append(f"{key}: {error_text(err)[:400]}")

            nf4_bytes = None
            try:
                impls, q = cases(suite, m, k, n, "nf4", impl)
                nf4_bytes = q.nbytes
                timed("dense_ms", *impls[DENSE]["fwd"])
                timed("xla_nf4_ms", *impls[XLA]["fwd"])
                timed("fused_nf4_ms", *impls[FUSED]["fwd"])
                for kind in ("int8", "int4"):
                    impls, _ = cases(suite, m, k, n, kind, impl)
                    timed(f"fused_{kind}_ms", *impls[FUSED]["fwd"])
            except Exception as err:
                errors.append(error_text(err)[:600])
            if "xla_nf4_ms" in row:
                xla_seconds[(m, k, n)] = row["xla_nf4_ms"] / 1e3
            fused = row.get("fused_nf4_ms")
            if fused and row.get("dense_ms"):
                row["nf4_vs_dense"] = row["dense_ms"] / fused
            if fused and row.get("xla_nf4_ms"):
                row["nf4_vs_xla"] = row["xla_nf4_ms"] / fused
            if fused and nf4_bytes:
                flops = 2 * m * k * n + 2 * m * rank * (k + n)
                moved = nf4_bytes + 2 * (m * k + m * n)
                floor = max(flops / peak if peak else 0.0, moved / bw if bw else 0.0)
                if floor:
                    row["floor_ms"] = floor * 1e3
                    row["x_floor"] = fused / (floor * 1e3)
            row["goal"] = _timing_goal(sec, row)
            if errors:
                row["error"] = "; ".join(errors)
            sec.add(row)
    sec.record["rows"].sort(key=lambda r: (r.get("K", 0), r.get("N", 0), r.get("M", 0)))


def _timing_goal(sec: Section, row: dict) -> str:
    m, vs_dense, vs_xla = row["M"], row.get("nf4_vs_dense"), row.get("nf4_vs_xla")
    shape = f"M={m} K={row['K']} N={row['N']}"
    if m <= 16 and vs_dense is not None and vs_xla is not None:
        return sec.goal(f"fused nf4, decode {shape}", ">= 3x dense, >= 5x XLA",
                        f"{vs_dense:.2f}x dense, {vs_xla:.2f}x XLA", vs_dense >= 3.0 and vs_xla >= 5.0)
    if m >= 2048 and vs_dense is not None:
        return sec.goal(f"fused nf4, {shape}", ">= 0.9x dense", f"{vs_dense:.2f}x dense", vs_dense >= 0.9)
    return ""


# --- 3. tile table ---------------------------------------------------------------------------------

def _candidates(m: int, heuristic, count: int) -> list:
    if m <= 16:
        more = [Tiles(bm=16, bn=bn, bk=64, splits=s, num_warps=4, num_stages=4) for bn in (64, 128) for s in (4, 16)]
    else:
        more = [Tiles(bm=bm, bn=bn, bk=64, splits=1, num_warps=w, num_stages=3)
                for bm, bn, w in ((64, 128, 4), (128, 128, 8), (128, 256, 8), (64, 64, 4))]
    out = [heuristic] if heuristic is not None else []
    for t in more[:count]:
        if t not in out:
            out.append(t)
    return out


def tile_table(sec: Section, suite) -> None:
    """qlora_matmul's ``autotune`` (kernel without LoRA per candidate vs XLA dequant + LoRA; "xla"
    where no candidate beats it) on fewer candidates, written through `jaxtune.kernels.tiles.write`."""
    interpret = suite.smoke
    path = Path(suite.args.tiles_out) if suite.args.tiles_out else (
        suite.out / "tiles.smoke.json" if suite.smoke else table.TABLE)
    entries: dict = {}
    sec.record["summary"].update(tiles_path=str(path), kind="nf4", entries=entries, written=0, chose_xla=[])
    xla_seconds = suite.ctx.get("xla_nf4_seconds", {})
    for m in suite.sizes.timing_ms:
        for k, n in suite.sizes.timing_kn:
            row = {"M": m, "K": k, "N": n}
            if sec.out_of_time():
                sec.skip(row)
                continue
            repeats = max(1, suite.sizes.repeats(m) // 2)
            try:
                impls, q = cases(suite, m, k, n, "nf4", "interpret" if interpret else "pallas")
                xla_fn, xla_inputs = impls[XLA]["fwd"]
                xla = xla_seconds.get((m, k, n))
                if xla is None:
                    xla = qm.median_seconds(lambda: xla_fn(*xla_inputs), repeats)
                heuristic = table.choose(m, n, k, "nf4", q.blocksize, "")  # device "": no entry, the heuristic
                candidates = _candidates(m, heuristic, suite.sizes.autotune_candidates)
                suite.log(f"  autotune M={m} K={k} N={n}: {len(candidates)} candidates")
                best, failures = qm.time_tiles(xla_inputs[0], q, n, candidates, repeats, interpret,
                                               stop=lambda best: sec.out_of_time() and best is not None)
                failed = [f"{_tiles_text(t)}: {error_text(err)[:200]}" for t, err in failures]
                entry = qm.table_entry(best, xla)
                name = table.key(suite.device_kind, "nf4", m, n, k)
                entries[name] = entry
                table.write({name: entry}, path)
                sec.record["summary"]["written"] = len(entries)
                if entry == "xla":
                    sec.record["summary"]["chose_xla"].append(f"M={m} K={k} N={n}")
                row.update(xla_ms=xla * 1e3, best_ms=None if best is None else best[0] * 1e3,
                           best_tiles=None if best is None else _tiles_text(best[1]), tried=len(candidates),
                           failed=len(failed), choice="xla" if entry == "xla" else "kernel")
                if failed:
                    row["failures"] = failed
                    row["note"] = f"{len(failed)} candidate(s) failed to compile or run"
            except Exception as err:
                row["error"] = error_text(err)
            sec.add(row)
    sec.record["rows"].sort(key=lambda r: (r.get("K", 0), r.get("N", 0), r.get("M", 0)))
    copy = ""
    if entries and path.resolve().parent != suite.out.resolve():
        try:  # a copy beside the results (only the output folder may come back from the machine)
            write_atomic(suite.out / "tiles.json", path.read_text())
            copy = f" (a copy of the table: {suite.out / 'tiles.json'})"
        except OSError:
            pass
    sec.note(f"{len(entries)} entries written to {path}{copy}; XLA chosen for "
             f"{', '.join(sec.record['summary']['chose_xla']) or 'no shape'}")


def _tiles_text(t) -> str:
    return f"bm{t.bm} bn{t.bn} bk{t.bk} s{t.splits} w{t.num_warps} st{t.num_stages}"
