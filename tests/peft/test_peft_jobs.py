"""`peft:` in a training job: the transform applied to the base, only the adapter trained and
checkpointed (plus a reference to the base), exact resume, restore for eval / generate, and
refusal to resume under another PEFT config."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxtune.config import from_dict
from jaxtune.eval.config import EvalConfig, EvalTaskConfig
from jaxtune.job import TrainJobConfig, load_model, run_eval_job, run_training
from jaxtune.job.assemble import with_peft
from jaxtune.job.schema import ModelSource
from jaxtune.models import Model
from jaxtune.peft import LoraWeight
from jaxtune.peft.config import PeftConfig
from jaxtune.peft.core import base_model
from jaxtune.utils.partition import split
from jaxtune.utils.tree import keypath_str
from tests.conftest import FINE_TUNE_COMMON


def _job(directory=None, steps=6, **peft):
    return from_dict(TrainJobConfig, {
        "model": {"preset": "tiny-llama"},
        "data": {"kind": "synthetic", "pad_fraction": 0.2},
        "peft": peft or {"lora": {"rank": 4, "alpha": 8, "targets": ["attention-qv", "mlp"], "dropout": 0.1}},
        "train": {"steps": steps, "batch_size": 4, "seq_len": 32, "log_every": 1, "eval_batches": 2},
        "optim": {"lr": 1e-2, "warmup_steps": 1, "schedule": "constant"},
        "checkpoint": {"directory": directory, "every_steps": 3, "keep_last": 3},
        "logging": {"progress": False, "tensorboard": False, "jsonl": False},
    })


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Six steps of a LoRA job, checkpointed at steps 3 and 6."""
    run = tmp_path_factory.mktemp("peft_jobs") / "run"
    return run, run_training(_job(str(run)))


def test_lora_job_trains_only_the_adapter_and_restores_onto_the_base(lora_run):
    run, result = lora_run
    assert 0 < result.trainable_params < 0.05 * result.total_params
    params = result.params
    cfg = load_model(ModelSource(preset="tiny-llama"))[1]
    start = jax.jit(lambda: Model(cfg).init(jax.random.key(0)))()  # built under jit, as the loop does
    # the base is bit-identical to the untouched preset init; the adapters moved
    for a, b in zip(jax.tree.leaves(base_model(params)), jax.tree.leaves(start)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lora = [x for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, LoraWeight)) if isinstance(x, LoraWeight)]
    assert len(lora) == 5 * 4 and all(float(np.abs(x.b).max()) > 0 for x in lora)

    # The checkpoint holds the trainable leaves only: every saved path is an A or a B.
    saved = ocp.StandardCheckpointer().metadata(run / "6" / "params").item_metadata
    paths = [keypath_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(saved)[0]]
    assert paths and all(p.endswith(("/a", "/b")) for p in paths), paths[:5]
    meta = json.loads((run / "train_meta.json").read_text())
    assert meta["peft"]["lora"]["rank"] == 4 and meta["base"]["preset"] == "tiny-llama"

    # load_model rebuilds the base, applies the transform and fills in the adapters.
    restored, _, _ = load_model(ModelSource(checkpoint=str(run)))
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    evaluated = held_out(dataclasses.replace(_job(None), model=ModelSource(checkpoint=str(run))))
    assert evaluated["loss"] == pytest.approx(result.evals[-1]["loss"], rel=1e-6)


def test_peft_resume_equals_uninterrupted_and_refuses_another_config(lora_run, tmp_path):
    source, full = lora_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    shutil.rmtree(run / "6")  # as if the job had died after step 3's checkpoint
    resumed = run_training(_job(str(run), steps=6))
    assert resumed.resumed_from == 3
    np.testing.assert_array_equal([h["loss"] for h in resumed.history], [h["loss"] for h in full.history[3:]])
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(full.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="peft"):
        run_training(_job(str(run), steps=9, lora={"rank": 8}))


def test_trainable_regex_adds_to_the_peft_mask():
    job = _job(None)
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, trainable=("final_norm",)))
    cfg = load_model(ModelSource(preset="tiny-llama"))[1]
    init = lambda rng: Model(cfg).init(rng)  # noqa: E731
    params, mask, _ = with_peft(job, init, cfg, None, optax.sgd(0.1))
    trainable, _ = split(jax.eval_shape(params, jax.random.key(0)), mask)
    paths = [keypath_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]]
    assert "final_norm/scale" in paths and len(paths) == 2 * 5 * 4 + 1
    _, no_peft_mask, _ = with_peft(dataclasses.replace(job, peft=PeftConfig()), init, cfg, None, optax.sgd(0.1))
    assert no_peft_mask is None  # the loop then applies train.trainable alone


def test_lora_on_a_pretrained_base_learns_a_new_style_the_base_does_not_know(tmp_path, shakespeare_base, arithmetic_style):
    """Full pretraining on Shakespeare, then LoRA on a style the base never saw (arithmetic
    sentences): held-out loss of the LoRA model falls well below the frozen base's."""
    tune = {**FINE_TUNE_COMMON, "model": {"checkpoint": str(shakespeare_base)}, "data": arithmetic_style,
            "peft": {"lora": {"rank": 8, "alpha": 16, "targets": ["all-linear"]}},
            "train": {"steps": 60, "batch_size": 8, "seq_len": 64, "eval_batches": 4},
            "checkpoint": {"directory": str(tmp_path / "lora")}}
    tuned = run_training(from_dict(TrainJobConfig, tune))
    frozen = held_out(from_dict(TrainJobConfig, {**tune, "peft": {}, "checkpoint": {}}))
    restored = held_out(from_dict(TrainJobConfig, {**tune, "peft": {}, "checkpoint": {},
                                                         "model": {"checkpoint": str(tmp_path / "lora")}}))
    assert tuned.trainable_params < 0.2 * tuned.total_params
    assert tuned.evals[-1]["loss"] < 0.75 * frozen["loss"], (tuned.evals[-1]["loss"], frozen["loss"])
    assert restored["loss"] == pytest.approx(tuned.evals[-1]["loss"], rel=1e-6)


def test_text_initialised_prompt_run_restores_without_its_tokenizer(tmp_path):
    """A prompt initialised from text needs the tokenizer to start, not to be restored: the
    whole prompt is in the checkpoint."""
    run = tmp_path / "run"
    result = run_training(from_dict(TrainJobConfig, {
        "model": {"preset": "tiny-llama"}, "tokenizer": {"kind": "byte"},
        "data": {"kind": "text", "path": "builtin:tinyshakespeare.txt"},
        "peft": {"prompt_tuning": {"num_virtual_tokens": 4, "init": "text", "init_text": "ROMEO:"}},
        "train": {"steps": 2, "batch_size": 4, "seq_len": 32, "eval_batches": 0},
        "optim": {"lr": 1e-2, "warmup_steps": 1, "schedule": "constant"},
        "checkpoint": {"directory": str(run)},
        "logging": {"progress": False, "tensorboard": False, "jsonl": False}}))
    restored, _, _ = load_model(ModelSource(checkpoint=str(run)))
    np.testing.assert_array_equal(np.asarray(restored["prompt"]["embedding"]),
                                  np.asarray(result.params["prompt"]["embedding"]))


def held_out(job):
    """`jaxtune eval`'s held-out loss over the batches the training run's periodic evaluation covers
    (train.eval_batches; `jaxtune eval` alone makes a full pass)."""
    limited = EvalConfig(tasks=(EvalTaskConfig(kind="loss", limit=job.train.eval_batches),))
    return run_eval_job(dataclasses.replace(job, eval=limited))["loss"]
