"""SFT end to end on this CPU: it measurably raises held-out exact match over the base model, zero- and
few-shot; and the shipped SFT recipes (full, LoRA, QLoRA) train and evaluate when shrunk to a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]


SFT_BEATS = """
import json, sys
from jaxtune.config import load_config
from jaxtune.job import TrainJobConfig, run_eval_job, run_training

base_run, run = sys.argv[1], sys.argv[2]
def recipe(*overrides):
    return load_config(TrainJobConfig, "configs/sft_addition_demo.yaml",
                       ["logging.progress=false", "logging.tensorboard=false", *overrides])
base = run_eval_job(recipe(f"model.checkpoint={base_run}"))
run_training(recipe(f"model.checkpoint={base_run}", f"checkpoint.directory={run}", "train.steps=400",
                    "train.eval_every=0", "train.steps_per_call=10"))
tuned = run_eval_job(recipe(f"model.checkpoint={run}"))
print(json.dumps({"base": base, "tuned": tuned}, default=float))
"""


def test_sft_beats_the_base_zero_and_few_shot_on_held_out_sums(tmp_path, shakespeare_base):
    """configs/sft_addition_demo.yaml on the session's Shakespeare base, 400 of its 600 steps, 10 per jitted
    call (exact match 0.492 measured 2026-12-02; the curve is not monotone this early).
    Run in a subprocess with XLA's optimisations on (tests/conftest.py turns them off for the suite's
    compile-bound tests; 400 steps and 256 generations are bound by run time instead)."""
    env = {**os.environ, "JAXTUNE_TEST_OPTIMIZED_XLA": "1",
           "XLA_FLAGS": " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                 if not f.startswith("--xla_backend_optimization_level"))}
    proc = subprocess.run([sys.executable, "-c", SFT_BEATS, str(shakespeare_base), str(tmp_path / "sft")], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    base, tuned = out["base"], out["tuned"]
    sft, zero, few = tuned["sum-0shot"]["exact_match"], base["sum-0shot"]["exact_match"], base["sum-3shot"]["exact_match"]
    print(f"exact match on 128 held-out sums: base 0-shot {zero:.3f}, base 3-shot {few:.3f}, SFT 0-shot {sft:.3f}")
    assert sft >= 0.15 and sft > zero + 0.1 and sft > few + 0.1
    assert tuned["loss"]["loss"] < base["loss"]["loss"] / 2


@pytest.mark.parametrize("recipe", ["sft_full_llama_small", "sft_qlora_llama_small"])  # LoRA = QLoRA without model.quant (test_sft.py runs LoRA SFT)
def test_sft_recipes_train_and_evaluate_shrunk_to_a_cpu(tmp_path, capsys, shakespeare_base, recipe):
    from jaxtune.cli.main import main

    run = tmp_path / "run"
    cpu = [f"model.checkpoint={shakespeare_base}", "model.dtype=float32", "model.attention_impl=dpa", "tokenizer.kind=byte",
           "tokenizer.path=null", "data.sources=[{path: 'builtin:gsm8k_train_slice.jsonl'}]", "train.seq_len=256",
           "train.batch_size=2", "train.eval_batches=1", "logging.progress=false", "logging.tensorboard=false",
           f"checkpoint.directory={run}"]
    if recipe == "sft_qlora_llama_small":
        cpu.append("model.quant.blocksize=32")
    assert main(["train", f"configs/{recipe}.yaml", "train.steps=2", "optim.warmup_steps=1", *cpu]) == 0
    # the job says how it chose the targets (the byte tokenizer has no template: the built-in ChatML)
    assert "targets: assistant turns of the built-in ChatML template" in capsys.readouterr().err
    tasks = ("eval.tasks=[{kind: loss}, {kind: generate, name: gsm8k, answer_pattern: gsm8k, limit: 2, batch_size: 2, max_new_tokens: 4, "
             "stop: ['<|im_end|>']}]")
    assert main(["eval", "--json", f"configs/{recipe}.yaml", *cpu, f"model.checkpoint={run}", tasks]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["loss"]["loss"] > 0 and results["gsm8k"]["examples"] == 2
