"""Eval task reward: sampled completions' rewards, and the KL to a reference recomputed from
full-sequence logits of the same tokens (no cache), zero against the policy itself."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxtune.align.rewards import uppercase
from jaxtune.config import from_dict
from jaxtune.data.tasks import shout_preferences
from jaxtune.data.tokenizer import ByteTokenizer
from jaxtune.eval.config import EvalTaskConfig
from jaxtune.job import ModelSource, TrainJobConfig
from tests.conftest import FINE_TUNE_COMMON


def _logps(directory, ids, start):
    from jaxtune.job import load_model
    from jaxtune.models import Model

    params, cfg, _ = load_model(ModelSource(checkpoint=str(directory)))
    logits = Model(cfg).apply(params, np.asarray([ids[:-1]], np.int32))
    logsm = np.asarray(jax.nn.log_softmax(logits[0].astype(np.float32), -1))
    return sum(logsm[t, ids[t + 1]] for t in range(start - 1, len(ids) - 1))


def test_reward_task_scores_samples_and_estimates_the_kl(shakespeare_base, shout_reward_model):
    from jaxtune.job import run_eval_job
    from jaxtune.job.assemble import load_reward_judge

    common = dict(max_new_tokens=6, batch_size=8, limit=4)
    tasks = [dict(kind="reward", name="kl", reward="uppercase", completions=2, reference=str(shout_reward_model), samples=8),
             dict(kind="reward", name="self", reward="uppercase", reference=str(shakespeare_base)),
             dict(kind="reward", name="rm", reward_model=str(shout_reward_model), temperature=0, completions=1, samples=4)]
    job = from_dict(TrainJobConfig, {**FINE_TUNE_COMMON, "model": {"checkpoint": str(shakespeare_base)},
                                     "data": {"kind": "sft", "sources": [{"path": "builtin:shout_sft.jsonl"}],
                                              "eval_sources": [{"path": "builtin:shout_eval.jsonl"}],
                                              "sft": {"columns": {"completion": "chosen"}}},
                                     "eval": {"tasks": [{**common, **t} for t in tasks]}})
    results = run_eval_job(job)
    tok = ByteTokenizer()
    kl = results["kl"]
    assert kl["completions"] == 8 and len(kl["samples"]) == 8
    assert kl["reward_mean"] == pytest.approx(np.mean([uppercase(s["completion"], "", {}) for s in kl["samples"]]))
    prompts = [r["prompt"] for r in shout_preferences(4, 1)]  # builtin:shout_eval.jsonl's first 4
    estimates = []
    for k, sample in enumerate(kl["samples"]):
        prompt = list(tok.encode(prompts[k // 2]))
        ids = prompt + list(tok.encode(sample["completion"])) + ([tok.eos_token_id] if sample["stopped"] else [])
        estimates.append(_logps(shakespeare_base, ids, len(prompt)) - _logps(shout_reward_model, ids, len(prompt)))
    assert kl["kl"] == pytest.approx(float(np.mean(estimates)), rel=1e-4, abs=1e-4) and kl["kl"] > 1.0
    assert results["self"]["kl"] == pytest.approx(0.0, abs=1e-5)
    rm = results["rm"]
    again = load_reward_judge(str(shout_reward_model), tok, 4)(prompts, [s["completion"] for s in rm["samples"]])
    assert rm["reward_mean"] == pytest.approx(float(np.mean(again)), rel=1e-4, abs=1e-4)


def test_reward_task_config_errors_name_the_task():
    with pytest.raises(ValueError, match="exactly one of reward"):
        EvalTaskConfig(kind="reward", name="r")
    with pytest.raises(ValueError, match="temperature 1"):
        EvalTaskConfig(kind="reward", name="r", reward="uppercase", temperature=0.7, reference="base")
