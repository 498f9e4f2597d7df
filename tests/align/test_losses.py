"""Preference losses against the published formulas and TRL's DPOTrainer on the same log-probs;
completion log-prob masking against full-sequence logits."""

from __future__ import annotations

from collections import defaultdict
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.align.losses import bradley_terry, preference_losses
from jaxtune.models.scoring import completion_logps

B, T = 6, 5  # pairs, completion tokens per side


@pytest.fixture(scope="module")
def logps():
    """Per-token log-probs of chosen and rejected completions (policy and reference), some padding."""
    rng = np.random.default_rng(0)
    per_token = -rng.uniform(0.05, 3.0, (2 * B, T))
    ref_per_token = -rng.uniform(0.05, 3.0, (2 * B, T))
    mask = np.ones((2 * B, T))
    mask[1, 3:] = 0
    mask[B + 2, 1:] = 0
    return per_token * mask, ref_per_token * mask, mask


def _sums(per_token, mask):
    s, n = per_token.sum(1), mask.sum(1)
    return s[:B], s[B:], n[:B], n[B:]


def trl_loss(per_token, ref_per_token, mask, loss_type, beta, label_smoothing=0.0):
    """TRL's DPOTrainer._compute_loss on given per-token log-probs (a stand-in model returns them)."""
    import torch
    from trl import DPOTrainer

    lp = torch.tensor(per_token, dtype=torch.float64)
    completion_mask = torch.tensor(np.concatenate([np.zeros((2 * B, 1)), mask], 1), dtype=torch.long)
    ref = ref_per_token.sum(1)
    outputs = SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp),
                              is_top1=torch.zeros_like(lp, dtype=torch.bool))
    model = SimpleNamespace(training=False)
    fake = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros((2 * B, T + 1), dtype=torch.long), "attention_mask": completion_mask,
              "completion_mask": completion_mask, "ref_chosen_logps": torch.tensor(ref[:B]),
              "ref_rejected_logps": torch.tensor(ref[B:])}
    loss = DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, False)
    return float(loss), {k: v[-1] for k, v in fake._metrics["eval"].items()}


@pytest.mark.parametrize("kind,trl_type,eps", [("sigmoid", "sigmoid", 0.0), ("hinge", "hinge", 0.0),
                                               ("ipo", "ipo", 0.0), ("robust", "robust", 0.2)])
def test_losses_equal_trl_on_the_same_log_probs(logps, kind, trl_type, eps):
    per_token, ref_per_token, mask = logps
    c, r, nc, nr = _sums(per_token, mask)
    rc, rr, _, _ = _sums(ref_per_token, mask)
    ours = preference_losses(kind, jnp.asarray(c), jnp.asarray(r), jnp.asarray(rc), jnp.asarray(rr), beta=0.3,
                             label_smoothing=eps, chosen_tokens=jnp.asarray(nc), rejected_tokens=jnp.asarray(nr))
    reference, metrics = trl_loss(per_token, ref_per_token, mask, trl_type, 0.3, eps)
    assert float(jnp.mean(ours)) == pytest.approx(reference, rel=1e-5)
    rewards_c, rewards_r = 0.3 * (c - rc), 0.3 * (r - rr)
    assert metrics["rewards/margins"] == pytest.approx(np.mean(rewards_c - rewards_r), rel=1e-6)
    assert metrics["rewards/accuracies"] == pytest.approx(np.mean(rewards_c > rewards_r))


def test_losses_equal_the_published_formulas():
    z_c, z_r, ref_c, ref_r = map(np.float64, (-3.0, -5.5, -3.4, -4.9))
    beta, eps = 0.5, 0.1
    d = (z_c - ref_c) - (z_r - ref_r)
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    expected = {
        "sigmoid": -math.log(sig(beta * d)),
        "conservative": -(1 - eps) * math.log(sig(beta * d)) - eps * math.log(sig(-beta * d)),
        "robust": (-(1 - eps) * math.log(sig(beta * d)) + eps * math.log(sig(-beta * d))) / (1 - 2 * eps),
        "hinge": max(0.0, 1 - beta * d),
        "ipo": ((z_c - ref_c) / 2 - (z_r - ref_r) / 3 - 1 / (2 * beta)) ** 2,
    }
    for kind, value in expected.items():
        got = preference_losses(kind, jnp.float32(z_c), jnp.float32(z_r), jnp.float32(ref_c), jnp.float32(ref_r),
                                beta=beta, label_smoothing=eps, chosen_tokens=jnp.float32(2), rejected_tokens=jnp.float32(3))
        assert float(got) == pytest.approx(value, rel=1e-5), kind
    # ORPO: mean per-token log-probs; odds = p / (1 - p)
    pc, pr = math.exp(z_c / 2), math.exp(z_r / 3)
    log_odds_ratio = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
    orpo = -z_c / 2 - 0.25 * math.log(sig(log_odds_ratio))
    got = preference_losses("orpo", jnp.float32(z_c), jnp.float32(z_r), beta=0.25, chosen_tokens=jnp.float32(2),
                            rejected_tokens=jnp.float32(3))
    assert float(got) == pytest.approx(orpo, rel=1e-5)
    bt = bradley_terry(jnp.float32(1.5), jnp.float32(0.25), margin=0.5, centering=0.01)
    assert float(bt) == pytest.approx(-math.log(sig(0.75)) + 0.01 * 1.75 ** 2, rel=1e-6)
    with pytest.raises(ValueError, match="preference loss must be one of"):
        preference_losses("kto", jnp.float32(0), jnp.float32(0))


def test_orpo_equals_trl_odds_ratio_loss():
    import torch

    rng = np.random.default_rng(1)
    mean_c, mean_r = -rng.uniform(0.1, 2.0, B), -rng.uniform(0.1, 2.0, B)
    nc, nr = rng.integers(1, 9, B).astype(float), rng.integers(1, 9, B).astype(float)
    ours = preference_losses("orpo", jnp.asarray(mean_c * nc), jnp.asarray(mean_r * nr), beta=0.1,
                             chosen_tokens=jnp.asarray(nc), rejected_tokens=jnp.asarray(nr))
    # TRL's ORPOTrainer.odds_ratio_loss (trl.experimental.orpo) on the mean log-probs; its loss is NLL - that
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    c, r = torch.tensor(mean_c), torch.tensor(mean_r)
    fake = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    trl_losses = ORPOTrainer.odds_ratio_loss(fake, c, r)[0].double()
    np.testing.assert_allclose(np.asarray(ours), (-c - trl_losses).numpy(), rtol=1e-5)


def test_completion_log_probs_sum_only_the_completion_targets():
    from jaxtune.models import Model
    from jaxtune.models.presets import preset
    from jaxtune.models.scoring import continuation_rows

    model = Model(preset("tiny-llama"))
    params = jax.jit(model.init)(jax.random.key(0))
    context, continuation = [10, 20, 30, 40], [50, 60, 70]
    rows = continuation_rows([(context, continuation)], 8)
    total, count = jax.jit(lambda p, r: completion_logps(model, p, r))(params, rows)
    logits = jax.jit(model.apply)(params, jnp.asarray([context + continuation]))
    logp = np.asarray(jax.nn.log_softmax(logits, -1))[0]
    expected = sum(logp[len(context) - 1 + i, t] for i, t in enumerate(continuation))
    assert float(count[0]) == 3 and float(total[0]) == pytest.approx(expected, rel=1e-5)
