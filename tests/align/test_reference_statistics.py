"""RL and reward-model statistics as TRL computes them: GRPO's group-normalised advantages (the
group's sample standard deviation, TRL's `nanstd`) and per-pair reward margins from the data (TRL's
``margin`` column) reaching the Bradley-Terry loss."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.trainer.utils import nanstd

from jaxtune.align.grpo import GRPOConfig, group_advantages
from jaxtune.align.preference import PreferenceObjectiveConfig, reward_loss, reward_scores
from jaxtune.data.preference import PairStream, PreferenceConfig, load_pairs
from jaxtune.data.sources import SourceConfig, build_source
from jaxtune.data.tasks import shout_preferences
from jaxtune.data.tokenizer import ByteTokenizer

BYTE = ByteTokenizer()


def _trl_group_advantages(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """TRL GRPOTrainer's advantages (scale_rewards="group"), in torch, with TRL's own nanstd."""
    r = torch.tensor(rewards, dtype=torch.float32)
    mean = torch.nanmean(r.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
    std = nanstd(r.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
    return ((r - mean) / (std + 1e-4)).numpy()


@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_grpo_advantages_equal_trl(group_size):
    rng = np.random.default_rng(group_size)
    rewards = np.concatenate([rng.normal(size=4 * group_size), rng.integers(0, 2, 2 * group_size).astype(float),
                              np.full(group_size, 0.5)])
    np.testing.assert_allclose(group_advantages(rewards, group_size), _trl_group_advantages(rewards, group_size),
                               rtol=1e-5, atol=1e-6)
    # the other convention, kept as an option: the population std (n in the denominator)
    r = rewards.reshape(-1, group_size)
    population = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(group_advantages(rewards, group_size, std="population"), population.reshape(-1), rtol=1e-5)
    assert GRPOConfig().reward_std == "sample"
    with pytest.raises(ValueError, match="reward_std must be sample or population"):
        group_advantages(rewards, group_size, std="biased")


def _pairs_file(tmp_path, rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [build_source(SourceConfig(path=str(path)))]


def test_per_pair_margins_reach_the_reward_loss_as_in_trl(tmp_path):
    from jaxtune.models import Model
    from jaxtune.models.heads import SCORE, HeadSpec, add_head
    from jaxtune.models.presets import preset

    rows = [{**r, "margin": m} for r, m in zip(shout_preferences(6, 0), [0.0, 0.5, 1.0, 2.0, -1.0, 3])]
    pairs = load_pairs(_pairs_file(tmp_path, rows), PreferenceConfig(), BYTE, seq_len=32)
    batch = next(PairStream(pairs, 6, 32, shuffle=False))
    assert batch["margin"].tolist() == [0.0, 0.5, 1.0, 2.0, -1.0, 3.0]

    cfg_model = preset("tiny-llama")
    model = Model(cfg_model)
    params = add_head(model.init(jax.random.key(0)), HeadSpec(SCORE, outputs=1), cfg_model, jax.random.key(1))
    params[SCORE]["kernel"] = params[SCORE]["kernel"] + 0.3  # scores away from 0
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    cfg = PreferenceObjectiveConfig(reward_centering=0.01)
    loss_sum, weight, _ = reward_loss(model, cfg)(params, batch, None)
    rc, rr = (torch.tensor(np.asarray(x), dtype=torch.float64) for x in reward_scores(model, params, batch))
    margin = torch.tensor(batch["margin"].tolist(), dtype=torch.float64)
    # TRL RewardTrainer.compute_loss: -logsigmoid(r_c - r_r - margin).mean() + c * mean((r_c + r_r)^2)
    trl = -torch.nn.functional.logsigmoid(rc - rr - margin).mean() + 0.01 * torch.mean((rc + rr) ** 2)
    assert float(loss_sum / weight) == pytest.approx(float(trl), rel=1e-5)
    without = reward_loss(model, cfg)(params, {k: v for k, v in batch.items() if k != "margin"}, None)[0]
    assert abs(float(without) - float(loss_sum)) > 1e-3  # the margins changed the loss


def test_margins_must_be_numbers_on_every_pair_or_none(tmp_path):
    rows = shout_preferences(4, 0)
    mixed = [{**rows[0], "margin": 1.0}] + rows[1:]
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: no field 'margin' .*3 of 4 lack one"):
        load_pairs(_pairs_file(tmp_path, mixed), PreferenceConfig(), BYTE, seq_len=32)
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1: .*'margin' .* must be a finite number, got 'big'"):
        load_pairs(_pairs_file(tmp_path, [{**rows[0], "margin": "big"}]), PreferenceConfig(), BYTE, seq_len=32)
    ignored = load_pairs(_pairs_file(tmp_path, mixed), PreferenceConfig(margin=None), BYTE, seq_len=32)
    assert "margin" not in next(PairStream(ignored, 4, 32))
