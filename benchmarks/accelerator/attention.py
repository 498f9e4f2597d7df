"""Section 4: attention forward + backward per implementation (blockwise, flash, cudnn, xla) at long
sequence lengths; the inputs and the jitted step are benchmarks/attention.py's."""

from __future__ import annotations

import logging
from typing import Optional

import jax
import jax.numpy as jnp

from jaxtune.kernels.flash_attention import gpu_flash_attention
from jaxtune.models import attention as attention_module

import attention as attention_bench  # benchmarks/attention.py
import qlora_matmul as qm  # benchmarks/qlora_matmul.py
from accelerator.record import GiB, Section, error_text, memory_stats, release_memory

ATTENTION_IMPLS = ("blockwise", "flash", "cudnn", "xla")


class _Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def attention(sec: Section, suite) -> None:
    suite.ctx.pop("weights", None)  # the kernel sections' matrices
    release_memory()
    heads, kv_heads, head_dim = suite.sizes.attn_heads
    sec.record["summary"].update(batch=1, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype="bfloat16",
                                 causal=True, flops="7 * heads * L^2 * head_dim (causal fwd + bwd)")
    logger = logging.getLogger(attention_module.__name__)
    timings: dict = {}
    for length in suite.sizes.attn_lengths:
        qkv = mask = None
        for impl in ATTENTION_IMPLS:
            row = {"length": length, "impl": impl}
            if sec.out_of_time():
                sec.skip(row)
                continue
            suite.log(f"  attention {impl} L={length}")
            try:
                if qkv is None:
                    qkv, mask = attention_bench.inputs(1, length, heads, kv_heads, head_dim)
                    qkv = [a.astype(jnp.bfloat16) for a in qkv]
                captured = _Captured()
                getattr(attention_module, "_warned", set()).clear()  # warn again for this call
                logger.addHandler(captured)
                try:
                    fn = (_flash_interpret_step(mask) if impl == "flash" and suite.smoke
                          else attention_bench.step(impl, mask, 0))
                    compiled = fn.lower(*qkv).compile()
                finally:
                    logger.removeHandler(captured)
                temp = _temp_bytes(compiled)
                row["temp_gib"] = None if temp is None else temp / GiB
                stats = memory_stats()
                if impl == "xla" and temp is not None and stats and "bytes_limit" in stats:
                    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
                    if temp > 0.9 * free:
                        row["note"] = f"skipped: would not fit ({temp / GiB:.1f} GiB temporaries, {free / GiB:.1f} free)"
                        sec.add(row)
                        continue
                seconds = qm.median_seconds(lambda: compiled(*qkv), suite.sizes.attn_repeats)
                row["ms"] = seconds * 1e3
                row["tflops"] = 7 * heads * length**2 * head_dim / seconds / 1e12
                if captured.messages:
                    row["note"] = "fell back: " + "; ".join(captured.messages)[:400]
                else:
                    timings.setdefault(length, {})[impl] = seconds
                compiled = None  # (its buffers go before the next implementation's)
            except Exception as err:
                row["error"] = error_text(err)
            sec.add(row)
    if timings:
        first = timings[min(timings)]
        usable = {i: s for i, s in first.items() if i in ("flash", "cudnn", "blockwise")}
        if usable:
            choice = min(usable, key=usable.get)
            suite.ctx["attention_for_training"] = choice
            sec.note(f"fastest at {min(timings)} tokens without fallback (blockwise / flash / cudnn): {choice} "
                     "(used by the training section)")


def _flash_interpret_step(mask):
    """benchmarks/attention.py's ``step`` for the Pallas GPU flash kernel in its interpreter (--smoke on CPU)."""

    def loss(q, k, v):
        out = gpu_flash_attention(q, k, v, mask, interpret=True)
        return jnp.sum(out * jnp.cos(jnp.arange(out.shape[-1], dtype=out.dtype)))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _temp_bytes(compiled) -> Optional[int]:
    try:
        analysis = compiled.memory_analysis()
        return int(analysis.temp_size_in_bytes) if analysis is not None else None
    except Exception:
        return None
