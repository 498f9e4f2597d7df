"""GRPO: group advantages, the clipped objective and KL against closed forms, a job raising the reward
with the KL bounded, and the step sharded over 8 fake CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.align.grpo import GRPOConfig, group_advantages, grpo_loss
from jaxtune.align.rewards import exact_number, reward_function, uppercase
from tests.conftest import SUITE_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[2]


def test_group_advantages_and_rewards():
    r = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(r, 4)
    np.testing.assert_allclose(adv[:4], (r[:4] - 0.5) / (np.sqrt(1 / 3) + 1e-4), rtol=1e-6)  # sample std (TRL)
    np.testing.assert_allclose(adv[4:], 0.0)  # a group with one reward teaches nothing
    np.testing.assert_allclose(group_advantages(r, 4, "none")[:4], r[:4] - 0.5)  # Dr. GRPO
    assert exact_number("so it is 72.", "#### 72", {}) == 1.0 and exact_number("#### 7", "#### 72", {}) == 0.0
    assert uppercase(" HEllo!", "", {}) == pytest.approx(0.4)
    assert reward_function("jaxtune.align.rewards:exact_text")(" yes\nmore", "yes", {}) == 1.0
    with pytest.raises(ValueError, match="unknown reward"):
        reward_function("nope")


def test_clipped_objective_and_k3_kl_equal_closed_forms():
    """A stand-in model whose per-token log-probs are the params: checks ratio, clip, KL, normalisations."""

    class Fixed:
        pass

    logp = jnp.log(jnp.array([[0.5, 0.25, 0.9], [0.2, 0.6, 0.3]]))
    old = jnp.log(jnp.array([[0.4, 0.25, 0.5], [0.2, 0.3, 0.3]]))
    ref = jnp.log(jnp.array([[0.5, 0.5, 0.5], [0.1, 0.6, 0.3]]))
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = jnp.array([1.0, -1.0])
    batch = {"loss_mask": mask, "old_logps": old, "advantages": adv, "ref_logps": ref, "rewards": jnp.array([1.0, 0.0])}
    import jaxtune.align.grpo as grpo

    original = grpo.token_logps
    entropy = jnp.array([[1.0, 2.0, 7.0], [0.5, 0.5, 2.0]])
    grpo.token_logps = lambda model, params, rows, rng=None, with_entropy=False: (
        jnp.where(rows["loss_mask"] > 0, params, 0.0), entropy, None)
    try:
        cfg = GRPOConfig(clip_eps=0.2, kl_coef=0.1, length_norm="sequence")
        total, n, metrics = grpo_loss(Fixed(), cfg, reference="batch")(logp, batch, None)
    finally:
        grpo.token_logps = original
    ratio = np.exp(np.asarray(logp) - np.asarray(old))
    a = np.asarray(adv)[:, None]
    obj = -np.minimum(ratio * a, np.clip(ratio, 0.8, 1.2) * a)
    d = np.asarray(ref) - np.asarray(logp)
    per_token = obj + 0.1 * (np.exp(d) - d - 1)
    m = np.asarray(mask)
    expected = sum((per_token[i] * m[i]).sum() / m[i].sum() for i in range(2))
    assert float(n) == 2 and float(total) == pytest.approx(expected, rel=1e-5)
    clipped = ((ratio < 0.8) | (ratio > 1.2)) * m
    assert float(metrics["clip_fraction"]) == pytest.approx(sum(clipped[i].sum() / m[i].sum() for i in range(2)), rel=1e-6)
    assert float(metrics["entropy"]) == pytest.approx(1.5 + 1.0, rel=1e-6)  # per-completion means over the mask, summed


def _grpo_args(base, run, steps):
    return ["configs/grpo_shout.yaml", f"model.checkpoint={base}", f"checkpoint.directory={run}", f"train.steps={steps}",
            "train.batch_size=16", "logging.progress=false", "logging.tensorboard=false", "train.log_every=1"]


def _history(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "train/reward" in line]


def test_grpo_raises_the_reward_with_a_bounded_kl(tmp_path, shakespeare_base):
    from jaxtune.cli.main import main

    run = tmp_path / "grpo"
    assert main(["train", *_grpo_args(shakespeare_base, run, 12), "optim.lr=1e-2"]) == 0
    history = _history(run)
    first, last = history[0]["train/reward"], np.mean([h["train/reward"] for h in history[-3:]])
    print(f"GRPO (LoRA, uppercase reward): step 1 reward {first:.3f}, last 3 steps {last:.3f}, "
          f"kl {history[-1]['train/kl']:.3f}")
    assert last > first + 0.3
    assert all(np.isfinite(h["train/kl"]) and h["train/kl"] < 20 for h in history)


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_rl_step_runs_sharded_on_eight_devices(tmp_path, shakespeare_base, method):
    """One GRPO / PPO step of the shipped recipe on a (2, 2, 2) mesh of 8 CPU devices (a subprocess)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
           f"--xla_cpu_collective_timeout_seconds=600 {SUITE_XLA_FLAGS}"}  # 8 device threads on 2 busy cores can lag each other
    run = tmp_path / method
    args = _grpo_args(shakespeare_base, run, 1)
    if method == "ppo":
        args = ["configs/ppo_shout.yaml", *args[1:], "objective.ppo.reward_model=null", "objective.ppo.reward=uppercase",
                "objective.ppo.epochs=1", "objective.ppo.minibatches=1"]
    proc = subprocess.run([sys.executable, "-m", "jaxtune.cli.main", "train", *args, "mesh.data=2", "mesh.fsdp=2",
                           "mesh.tensor=2"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    key = "train/reward" if method == "grpo" else "train/score"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if key in line]
    assert len(history) == 1 and np.isfinite(history[0]["train/loss"])


@pytest.mark.parametrize("policy", ["full", "qlora"])  # LoRA policies: every other test here
def test_rl_and_dpo_start_at_their_reference_for_full_and_qlora_policies(tmp_path, shakespeare_base, policy):
    """Full fine-tuning keeps a frozen copy of the starting weights (GRPO / PPO) or precomputed
    log-probs (DPO); a QLoRA policy's reference is its quantized base with the adapter disabled.
    Either way the first step sees the policy equal to its reference: KL 0, DPO loss log 2."""
    from jaxtune.cli.main import main

    kind = ["peft.lora=null"] if policy == "full" else ["model.quant.kind=nf4", "model.quant.blocksize=32"]
    small = [f"model.checkpoint={shakespeare_base}", "train.steps=1", "train.batch_size=4", "train.log_every=1",
             "logging.progress=false", "logging.tensorboard=false", *kind]
    jobs = {"grpo": ["configs/grpo_shout.yaml", "objective.grpo.max_new_tokens=4"],
            "ppo": ["configs/ppo_shout.yaml", "objective.ppo.reward_model=null", "objective.ppo.reward=uppercase",
                    "objective.ppo.epochs=1", "objective.ppo.minibatches=1", "objective.ppo.max_new_tokens=4"],
            "dpo": ["configs/dpo_shout.yaml", "train.eval_batches=0", "objective.preference.sft_weight=0"]}
    # full: the frozen copy (GRPO's ref_logps, PPO's rollout KL); QLoRA: the disabled adapter over the
    # 4-bit base (PPO's rollout KL, DPO's loss); full-FT DPO's log 2 is checked in test_preference.py
    for name in ("grpo", "ppo") if policy == "full" else ("ppo", "dpo"):
        args, run = jobs[name], tmp_path / name
        assert main(["train", *args, *small, f"checkpoint.directory={run}"]) == 0
        first = json.loads([line for line in (run / "metrics.jsonl").read_text().splitlines() if "train/loss" in line][0])
        if name == "dpo":
            assert first["train/loss"] == pytest.approx(np.log(2), rel=1e-5)
        else:
            assert first["train/kl"] == pytest.approx(0.0, abs=1e-5) and np.isfinite(first["train/loss"])
