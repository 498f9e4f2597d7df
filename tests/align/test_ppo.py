"""PPO: GAE against a hand-computed case, the loss at the rollout point in closed form, and a PPO job
raising the score (Python reward and reward model) with the KL reported."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.align.ppo import PPOConfig, gae


def test_gae_equals_a_hand_computed_case():
    rewards = np.array([[0.0, 0.0, -0.1, 0.2, 1.0, 0.0]])
    values = np.array([[9.0, 0.5, 0.6, 0.4, 0.7, 9.0]])
    mask = np.array([[0, 1, 1, 1, 1, 0]], np.float32)  # steps 1..4; values off the mask are ignored
    g, lam = 0.9, 0.8
    d4 = 1.0 - 0.7
    d3 = 0.2 + g * 0.7 - 0.4
    d2 = -0.1 + g * 0.4 - 0.6
    d1 = 0.0 + g * 0.6 - 0.5
    a4 = d4
    a3 = d3 + g * lam * a4
    a2 = d2 + g * lam * a3
    a1 = d1 + g * lam * a2
    adv, ret = gae(rewards, values * mask, mask, g, lam)
    np.testing.assert_allclose(adv[0], [0, a1, a2, a3, a4, 0], rtol=1e-6)
    np.testing.assert_allclose(ret[0], [0, a1 + 0.5, a2 + 0.6, a3 + 0.4, a4 + 0.7, 0], rtol=1e-6)
    one, _ = gae(rewards, values * mask, mask, 1.0, 1.0)  # gamma = lambda = 1: reward-to-go minus value
    np.testing.assert_allclose(one[0, 1:5], np.cumsum(rewards[0, 1:5][::-1])[::-1] - (values * mask)[0, 1:5], rtol=1e-6)


def test_ppo_loss_at_the_rollout_point_is_minus_the_advantage_plus_the_value_error():
    import jaxtune.align.ppo as ppo

    cfg = PPOConfig(reward="uppercase", vf_coef=0.5)
    logp = jnp.log(jnp.array([[0.5, 0.2, 0.7]]))
    values = jnp.array([[0.1, 0.3, -0.2]])
    batch = {"loss_mask": jnp.array([[1.0, 1.0, 0.0]]), "old_logps": logp, "advantages": jnp.array([[1.5, -0.5, 9.0]]),
             "old_values": values, "returns": jnp.array([[1.1, 0.3, 4.0]]), "scores": jnp.array([2.0]),
             "kl": jnp.array([0.3]), "explained_variance": jnp.array([0.1])}
    original = ppo._forward
    ppo._forward = lambda model, params, rows, rng=None, value_model=None: (logp, jnp.zeros_like(logp), values)
    try:
        total, n, metrics = ppo.ppo_loss(None, cfg)(None, batch, None)
    finally:
        ppo._forward = original
    # ratio 1, V = V_old: policy term -A, value term 0.5 (V - R)^2, both averaged over the 2 masked tokens
    expected = (-1.5 + 0.5) / 2 + 0.5 * (0.5 * 1.0 ** 2 + 0.0) / 2
    assert float(n) == 1 and float(total) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["score"]) == 2.0 and float(metrics["clip_fraction"]) == 0.0


def test_ppo_job_raises_the_score_and_reports_kl(tmp_path, shakespeare_base):
    from jaxtune.cli.main import main

    run = tmp_path / "ppo"
    args = ["configs/ppo_shout.yaml", f"model.checkpoint={shakespeare_base}", f"checkpoint.directory={run}",
            "objective.ppo.reward_model=null", "objective.ppo.reward=uppercase", "train.steps=24", "train.log_every=4",
            "optim.lr=1e-2", "logging.progress=false", "logging.tensorboard=false"]
    assert main(["train", *args]) == 0
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "train/score" in line]
    first, last = history[0]["train/score"], history[-1]["train/score"]
    print(f"PPO (LoRA, uppercase reward): score {first:.3f} -> {last:.3f}, kl {history[-1]['train/kl']:.3f}")
    assert last > first + 0.2
    assert all(np.isfinite(h["train/kl"]) and np.isfinite(h["train/value_loss"]) for h in history)
    meta = json.loads((run / "train_meta.json").read_text())
    assert meta["head"]["key"] == "value_head"
    from jaxtune.job import ModelSource, load_model

    params, _, _ = load_model(ModelSource(checkpoint=str(run)))  # the policy restores with its value head
    assert params["value_head"]["kernel"].shape == (128, 1)


def test_separate_value_model_starts_as_the_reward_model_and_trains_with_the_policy(tmp_path, shakespeare_base,
                                                                                     shout_reward_model):
    import jax

    from jaxtune.align.ppo import _values, value_network
    from jaxtune.cli.main import main
    from jaxtune.data.tokenizer import ByteTokenizer
    from jaxtune.job import ModelSource, load_model
    from jaxtune.job.assemble import load_reward_judge
    from jaxtune.models import Model
    from jaxtune.parallel.mesh import make_mesh
    from jaxtune.parallel.rules import param_specs

    rm, rm_cfg, _ = load_model(ModelSource(checkpoint=str(shout_reward_model)))
    net = value_network(rm, rm_cfg, jax.random.key(0))
    assert "lm_head" not in net and "score" not in net and net["value_head"] is rm["score"]
    # V at a completion's last token is the reward model's score of that text (TRL's value-model start)
    tok = ByteTokenizer()
    prompt, completion = "Say abc:", " ABC!"
    ids = list(tok.encode(prompt + completion))
    rows = {"tokens": np.asarray([ids[:-1] + [0] * 4], np.int32), "segment_ids": np.asarray([[1] * (len(ids) - 1) + [0] * 4], np.int32)}
    rows["positions"] = np.arange(rows["tokens"].shape[1], dtype=np.int32)[None]
    values = np.asarray(_values(None, {"value_model": net}, rows, Model(rm_cfg)))
    score = load_reward_judge(str(shout_reward_model), tok, 1)([prompt[:-1]], [prompt[-1] + completion[:-1]])
    assert values[0, len(ids) - 2] == pytest.approx(float(score[0]), rel=1e-4, abs=1e-4)
    specs = param_specs({"value_model": net, **net}, make_mesh(), warn=False)
    assert {k: specs["value_model"][k] for k in net} == {k: specs[k] for k in net}  # nested: sharded by the same rules
    assert specs["embed"]["embedding"] != jax.sharding.PartitionSpec()

    run = tmp_path / "ppo_vm"
    args = ["configs/ppo_shout.yaml", f"model.checkpoint={shakespeare_base}", f"checkpoint.directory={run}",
            "objective.ppo.reward_model=null", "objective.ppo.reward=uppercase", f"objective.ppo.value_model={shout_reward_model}",
            "train.steps=2", "train.log_every=1", "train.batch_size=8", "logging.progress=false", "logging.tensorboard=false"]
    assert main(["train", *args]) == 0
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "train/value_loss" in line]
    assert len(history) == 2 and all(np.isfinite(h["train/value_loss"]) for h in history)
    meta = json.loads((run / "train_meta.json").read_text())
    assert meta["head"]["key"] == "value_model" and meta["head"]["model_config"]["vocab_size"] == rm_cfg.vocab_size
    params, _, _ = load_model(ModelSource(checkpoint=str(run)))  # restores LoRA policy + the whole value network
    trained = params["value_model"]
    assert jax.tree.structure(trained) == jax.tree.structure(net) and "value_head" not in params
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(net))]
    assert min(moved) > 0  # every value-network leaf trained (trunk and head)
