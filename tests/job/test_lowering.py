"""Every shipped recipe's train, eval and decode programs lowered for CUDA and for TPU on a mesh of
8 fake CPU devices (lowering only, no compile: `jaxtune.job.lowering`), shrunk to small shapes with
the same structure (tests/job/lowering_worker.py). Checks that each lowers, and that the fused kernels
are really in the lowered programs: the quantized matmul (Triton / Mosaic, forward and transposed) in
every QLoRA recipe, attention kernels (Pallas flash / splash) wherever attention_impl=auto can use them.

JAX's cuDNN attention looks for cuDNN while tracing, so a recipe asking for attention_impl=cudnn is
lowered with the Pallas GPU kernel instead (lowering_worker.NOT_LOWERABLE_HERE; no shipped recipe asks
for it today)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jaxtune.job.objectives import get_objective
from jaxtune.quant.matmul import KERNEL_ROWS
from tests.conftest import SUITE_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
HALVES = [RECIPES[0::2], RECIPES[1::2]]  # two workers' worth, each in its own 8-device process
QUANT = {"cuda": {"train": ("triton:nf4_matmul", "triton:nf4_matmul_t"), "eval": ("triton:nf4_matmul",),
                  "decode": ("triton:nf4_matmul",)},
         "tpu": {"train": ("tpu_custom_call:nf4_matmul_tpu", "tpu_custom_call:nf4_matmul_t_tpu"),
                 "eval": ("tpu_custom_call:nf4_matmul_tpu",), "decode": ("tpu_custom_call:nf4_matmul_tpu",)}}
ATTENTION = {"cuda": "triton:mha_forward", "tpu": "tpu_custom_call:splash_mqa_fwd"}
PROMPT_METHODS = ("prefix_tuning", "prompt_tuning", "p_tuning")  # prefix key columns: blockwise attention


def _lowered(names: list[str]) -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {SUITE_XLA_FLAGS}"}
    out = subprocess.run([sys.executable, str(ROOT / "tests/job/lowering_worker.py"), *names], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert out.returncode == 0 and len(records) == len(names), out.stderr[-3000:]
    return {r["config"]: r for r in records}


def _recipe(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / name).read_text())


@pytest.mark.parametrize("half", [0, 1])
def test_every_recipe_lowers_for_cuda_and_tpu_with_its_kernels(half):
    records = _lowered(HALVES[half])
    errors = [r["error"] for r in records.values() if "error" in r]
    assert not errors, "\n".join(errors)
    for name, record in records.items():
        data, lowered = _recipe(name), record["lowered"]
        generation = "prompts" in data  # generate / label recipes: decode only
        kind = (data.get("objective") or {}).get("kind", "causal")
        programs = ("decode",) if generation else ("train", "eval") + (("decode",) if get_objective(kind).generates else ())
        assert sorted(lowered) == sorted(f"{p}/{pl}" for p in programs for pl in ("cuda", "tpu")), name
        model, peft = data.get("model") or data.get("policy") or {}, data.get("peft") or {}
        for platform in ("cuda", "tpu"):
            if (model.get("quant") or {}).get("kind") == "nf4":
                # auto takes the kernel below KERNEL_ROWS rows per device: a micro-batch (8 x 128 rows over 8
                # devices) trains, decode has 8 rows; eval runs the whole batch (8 x grad_accum x 128 rows)
                accum = (data.get("train") or {}).get("grad_accum", 1)
                for program in [p for p in programs if p != "eval" or accum * 128 < KERNEL_ROWS]:
                    for kernel in QUANT[platform][program]:
                        assert lowered[f"{program}/{platform}"].get(kernel), (name, program, platform, kernel)
                # one micro-batch of 8 x 128 rows split over the 8 devices: the kernel sees its device's rows
                assert record["quant_kernel_rows"] == [128], (name, record["quant_kernel_rows"])
            if not generation and not any(peft.get(m) for m in PROMPT_METHODS):
                assert any(k.startswith(ATTENTION[platform]) for k in lowered[f"train/{platform}"]), (name, platform)


def test_the_halves_cover_every_recipe():
    assert sorted(HALVES[0] + HALVES[1]) == RECIPES and len(RECIPES) > 30
