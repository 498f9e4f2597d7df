"""Preference data (pairs, the HH dialogue layout on real data, malformed pairs counted), the DPO
reference from the adapter-disabled policy, and reward-model / DPO jobs learning a known preference."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.config import from_dict
from jaxtune.data.preference import PairStream, PreferenceConfig, load_pairs, split_dialogues
from jaxtune.data.sources import SourceConfig, build_source
from jaxtune.data.tasks import shout_preferences, write_jsonl
from jaxtune.data.tokenizer import ByteTokenizer
from jaxtune.job import TrainJobConfig
from tests.conftest import FINE_TUNE_COMMON

BYTE = ByteTokenizer()
HH = Path(__file__).resolve().parents[1] / "fixtures" / "hh_rlhf_harmless_base_slice.jsonl"
TAG = "\n\nAssistant:"


def test_hh_dialogues_split_at_the_last_shared_assistant_turn():
    rows = [json.loads(line) for line in HH.read_text().splitlines()]
    pairs = load_pairs([build_source(SourceConfig(path=str(HH)))], PreferenceConfig(), BYTE, seq_len=8192)
    assert len(pairs.examples) + sum(pairs.counts.values()) == len(rows) == 48
    for row in rows[:20]:
        pair = split_dialogues(row["chosen"], row["rejected"], TAG)
        if pair is None:
            continue
        assert pair.prompt.endswith(TAG) and pair.prompt + pair.chosen == row["chosen"]
        assert pair.prompt + pair.rejected == row["rejected"]
        assert TAG not in pair.chosen.split("\n\nHuman:")[0]  # the completion is one assistant turn's text onward
        assert pair.prompt.count("\n\nHuman:") >= 1
    example = pairs.examples[0]
    assert BYTE.decode(example.prompt) == split_dialogues(rows[0]["chosen"], rows[0]["rejected"], TAG).prompt
    assert example.chosen[-1] == BYTE.eos_token_id


def test_malformed_pairs_are_counted_and_bad_rows_named(tmp_path):
    rows = [{"prompt": "p", "chosen": " a", "rejected": " b"}, {"prompt": "p", "chosen": " same", "rejected": " same"},
            {"prompt": "p", "chosen": "", "rejected": " b"},
            {"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "Hello there"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    pairs = load_pairs([build_source(SourceConfig(path=str(path)))], PreferenceConfig(format="auto"), BYTE, seq_len=64)
    assert dict(pairs.counts) == {"identical": 1, "empty": 1, "no_shared_prefix": 1} and len(pairs.examples) == 1
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: no field 'rejected'"):
        load_pairs([build_source(SourceConfig(path=str(bad)))], PreferenceConfig(), BYTE, seq_len=64)


def test_pair_batches_mask_only_the_completions(tmp_path):
    path = write_jsonl(tmp_path / "shout.jsonl", shout_preferences(5, 0))
    pairs = load_pairs([build_source(SourceConfig(path=str(path)))], PreferenceConfig(), BYTE, seq_len=32)
    batch = next(PairStream(pairs, 4, 32, shuffle=False))
    first = shout_preferences(5, 0)[0]
    for side in ("chosen", "rejected"):
        targets = batch[f"{side}_targets"][0][batch[f"{side}_loss_mask"][0] > 0]
        assert BYTE.decode(targets[:-1]) == first[side] and targets[-1] == BYTE.eos_token_id
        assert BYTE.decode(batch[f"{side}_tokens"][0][: len(first["prompt"])]) == first["prompt"]
    assert batch["pair_mask"].tolist() == [1, 1, 1, 1]


def test_reference_from_the_disabled_adapter_equals_a_frozen_copy_of_the_base(tmp_path):
    from jaxtune.align.preference import PreferenceObjectiveConfig, dpo_loss, precompute_reference
    from jaxtune.models import Model
    from jaxtune.models.presets import preset
    from jaxtune.peft.lora import LoraConfig, apply_lora

    model = Model(preset("tiny-llama"))
    base = jax.jit(model.init)(jax.random.key(0))
    policy = apply_lora(base, LoraConfig(rank=4, targets=("all-linear",)), jax.random.key(1))
    policy = jax.tree.map(lambda x: x + 0.05 if x.ndim == 2 and x.shape[0] == 4 else x, policy)  # B != 0: policy != base
    path = write_jsonl(tmp_path / "shout.jsonl", shout_preferences(6, 1))
    pairs = load_pairs([build_source(SourceConfig(path=str(path)))], PreferenceConfig(), BYTE, seq_len=32)
    pairs.reference = precompute_reference(model, base, pairs, batch_size=3, seq_len=32)  # a separate frozen copy
    batch = {k: jnp.asarray(v) for k, v in next(PairStream(pairs, 6, 32, shuffle=False)).items()}
    cfg = PreferenceObjectiveConfig(beta=0.5)
    via_adapter = jax.jit(dpo_loss(model, cfg, reference="adapter"))(policy, batch, None)
    via_copy = jax.jit(dpo_loss(model, cfg, reference="precomputed"))(policy, batch, None)
    assert float(via_adapter[0]) == pytest.approx(float(via_copy[0]), rel=1e-5)
    assert float(via_adapter[2]["reward_margin"]) == pytest.approx(float(via_copy[2]["reward_margin"]), rel=1e-4, abs=1e-6)
    assert float(via_adapter[0]) != pytest.approx(6 * np.log(2), rel=1e-3)  # the policy differs from its reference


def _shout_data(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", shout_preferences(400, 0))
    held = write_jsonl(tmp_path / "eval.jsonl", shout_preferences(64, 1))
    return {"kind": "preference", "sources": [{"path": str(train)}], "eval_sources": [{"path": str(held)}]}


def _job(data, objective, directory=None, **extra):
    return from_dict(TrainJobConfig, {**FINE_TUNE_COMMON, "model": {"preset": "tiny-llama"}, "data": data,
                                      "objective": objective,
                                      "train": {"steps": 30, "batch_size": 8, "seq_len": 32, "eval_batches": 8},
                                      "checkpoint": {"directory": str(directory) if directory else None}, **extra})


def test_reward_model_learns_the_preference_and_eval_restores_it(tmp_path):
    from jaxtune.job import run_eval_job, run_training

    data = _shout_data(tmp_path)
    result = run_training(_job(data, {"kind": "reward"}, tmp_path / "rm"))
    held_out = result.evals[-1]
    assert held_out["accuracy"] >= 0.95 and held_out["margin"] > 1.0, held_out
    responses = write_jsonl(tmp_path / "responses.jsonl", [{"prompt": r["prompt"], "response": r[side]}
                                                           for r in shout_preferences(16, 1) for side in ("chosen", "rejected")])
    tasks = {"tasks": [{"kind": "loss"}, {"kind": "score", "name": "pairs"},
                       {"kind": "score", "name": "single", "sources": [{"path": str(responses)}]}]}
    restored = run_eval_job(_job(data, {"kind": "reward"}, model={"checkpoint": str(tmp_path / "rm")}, eval=tasks))
    assert restored["loss"]["accuracy"] == pytest.approx(held_out["accuracy"])
    assert restored["pairs"]["accuracy"] == pytest.approx(held_out["accuracy"])  # the same 64 held-out pairs
    assert restored["pairs"]["margin"] == pytest.approx(held_out["margin"], rel=1e-4)
    single = [s["score"] for s in restored["single"]["samples"]]
    assert restored["single"]["responses"] == 32 and single[0] > single[1]  # shouted answer scores higher


def test_dpo_raises_held_out_preference_accuracy(tmp_path, shakespeare_base):
    from jaxtune.job import run_training

    data = _shout_data(tmp_path)
    common = {"model": {"checkpoint": str(shakespeare_base)}, "optim": {**FINE_TUNE_COMMON["optim"], "lr": 1e-2}}
    lora = run_training(_job(data, {"kind": "dpo", "preference": {"beta": 0.5}}, peft={"lora": {"rank": 8, "targets": "all-linear"}},
                             train={"steps": 30, "batch_size": 8, "seq_len": 32, "eval_batches": 8, "eval_every": 30}, **common))
    full = run_training(_job(data, {"kind": "dpo", "preference": {"beta": 0.5}},
                             train={"steps": 1, "batch_size": 8, "seq_len": 32, "eval_batches": 8}, **common))
    # full fine-tuning uses a precomputed reference: before its one step the policy is the reference, so
    # the first loss is -log sigmoid(0) = log 2 exactly
    assert full.history[0]["loss"] == pytest.approx(np.log(2), rel=1e-5)
    held_out = lora.evals[-1]
    print(f"DPO (LoRA, 30 steps) held-out: reward accuracy {held_out['reward_accuracy']:.3f}, "
          f"margin {held_out['reward_margin']:.3f}, loss {held_out['loss']:.3f}")
    assert held_out["reward_accuracy"] >= 0.9 and held_out["reward_margin"] > 0.5 and held_out["loss"] < 0.5


def test_the_hh_dpo_recipe_trains_and_evaluates_shrunk_to_a_cpu(tmp_path, capsys, shakespeare_base):
    """configs/dpo_hh_llama_small.yaml on the HH fixture (real dialogues), the session base, 2 steps."""
    from jaxtune.cli.main import main

    run = tmp_path / "dpo_hh"
    cpu = [f"model.checkpoint={shakespeare_base}", "model.dtype=float32", "model.attention_impl=dpa", "tokenizer.kind=byte",
           "tokenizer.path=null", f"data.sources=[{{path: '{HH}'}}]", "data.eval_fraction=0.25", "train.seq_len=256",
           "train.batch_size=2", "train.eval_batches=2", "logging.progress=false", "logging.tensorboard=false",
           "train.log_every=1", f"checkpoint.directory={run}"]
    assert main(["train", "configs/dpo_hh_llama_small.yaml", "train.steps=2", "optim.warmup_steps=1", "optim.lr=1e-3", *cpu]) == 0
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    assert history[0]["step"] == 1 and history[0]["train/loss"] == pytest.approx(np.log(2), rel=1e-5)  # LoRA starts as its reference
    assert main(["eval", "--json", "configs/dpo_hh_llama_small.yaml", *cpu, f"model.checkpoint={run}"]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.isfinite(results["loss"]["loss"]) and 0.0 <= results["loss"]["reward_accuracy"] <= 1.0
