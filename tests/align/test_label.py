"""RLAIF labelling: completions sampled from a policy, ranked by a reward model or an LLM judge, written
as a preference file that DPO trains on directly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxtune.config import from_dict
from jaxtune.data.tasks import shout_preferences, write_jsonl
from jaxtune.job import TrainJobConfig
from tests.conftest import FINE_TUNE_COMMON


def _prompts(tmp_path, n=6):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in shout_preferences(n, 5)])


def test_reward_judged_labels_are_a_valid_preference_file_dpo_trains_on(tmp_path, shakespeare_base, shout_reward_model):
    from jaxtune.data.tokenizer import ByteTokenizer
    from jaxtune.job import ModelSource, load_model, run_training
    from jaxtune.job.label import LabelJobConfig, label, reward_judge
    from jaxtune.models import Model

    out = tmp_path / "labels.jsonl"
    cfg = from_dict(LabelJobConfig, {"policy": {"checkpoint": str(shakespeare_base)}, "prompts": [{"path": str(_prompts(tmp_path))}],
                                     "samples": 3, "sampling": {"max_new_tokens": 8, "temperature": 1.0},
                                     "judge": "reward", "judge_model": {"checkpoint": str(shout_reward_model)},
                                     "batch_size": 6, "output": str(out)})
    summary = label(cfg)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["pairs"] == len(rows) > 0 and summary["prompts"] == 6
    assert summary["pairs"] + sum(summary["skipped"].values()) == 6
    params, mcfg, _ = load_model(ModelSource(checkpoint=str(shout_reward_model)))
    score = reward_judge(Model(mcfg), params, ByteTokenizer(), 4)
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "judge"}
        assert row["chosen"] != row["rejected"] and row["chosen_score"] > row["rejected_score"]
    again = score([r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    np.testing.assert_allclose(again[: len(rows)], [r["chosen_score"] for r in rows], rtol=1e-4, atol=1e-4)
    with pytest.raises(FileExistsError, match="never overwritten"):
        label(cfg)
    # DPO reads the file as it is (pairs layout); full fine-tuning: the first loss is log 2 exactly
    dpo = run_training(from_dict(TrainJobConfig, {**FINE_TUNE_COMMON, "model": {"checkpoint": str(shakespeare_base)},
                                                  "data": {"kind": "preference", "sources": [{"path": str(out)}],
                                                           "eval_sources": [{"path": str(out)}]},
                                                  "objective": {"kind": "dpo"},
                                                  "train": {"steps": 2, "batch_size": 2, "seq_len": 32, "eval_batches": 1}}))
    assert dpo.history[0]["loss"] == pytest.approx(np.log(2), rel=1e-5)


def test_llm_judge_asks_both_orders_and_ranks_by_wins(tmp_path):
    import jax

    from jaxtune.data.tokenizer import ByteTokenizer
    from jaxtune.job.label import JUDGE_TEMPLATE, LabelJobConfig, label, llm_preference, rank
    from jaxtune.models import Model
    from jaxtune.models.presets import preset
    from jaxtune.models.scoring import continuation_rows, sequence_logprobs

    model, tok = Model(preset("tiny-llama")), ByteTokenizer()
    params = jax.jit(model.init)(jax.random.key(2))
    prefer = llm_preference(model, params, tok, JUDGE_TEMPLATE, 4)
    got = prefer([("Say hi:", " HI!", " hi."), ("Say hi:", " hi.", " HI!")])
    assert got[0] == pytest.approx(-got[1], rel=1e-5, abs=1e-6)  # swapping the responses flips the verdict

    def logp(a, b, answer):
        context = tok.encode(JUDGE_TEMPLATE.format(prompt="Say hi:", a=a, b=b))
        return float(sequence_logprobs(model, params, continuation_rows([(context, tok.encode(answer))], 160))[0][0])

    by_hand = 0.5 * ((logp(" HI!", " hi.", " A") - logp(" HI!", " hi.", " B")) + (logp(" hi.", " HI!", " B") - logp(" hi.", " HI!", " A")))
    assert got[0] == pytest.approx(by_hand, rel=1e-4, abs=1e-5)
    assert rank(["x", "y", "z"], np.array([1.0, -2.0, -0.5])).argmax() == 2  # z beats x and y
    summary = label(from_dict(LabelJobConfig, {"policy": {"preset": "tiny-llama"}, "tokenizer": {"kind": "byte"},
                                               "prompts": [{"path": str(_prompts(tmp_path, 2))}], "samples": 2, "judge": "llm",
                                               "sampling": {"max_new_tokens": 4}, "batch_size": 4,
                                               "output": str(tmp_path / "llm.jsonl")}))
    assert summary["pairs"] + sum(summary["skipped"].values()) == 2
