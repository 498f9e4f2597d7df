"""SFT training: packing never mixes examples, accumulation normalises over completion tokens, and
LoRA / QLoRA SFT jobs restore for `jaxtune eval` with the metrics they had in training."""

from __future__ import annotations

from functools import partial
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtune.config import from_dict
from jaxtune.data.instruct import InstructConfig
from jaxtune.data.sft import ExampleStream, load_examples
from jaxtune.data.sources import SourceConfig, build_source
from jaxtune.data.tokenizer import ByteTokenizer
from jaxtune.job import TrainJobConfig
from jaxtune.models import Model, ModelConfig
from jaxtune.train.losses import causal_lm_loss
from jaxtune.train.step import TrainState, make_train_step
from tests.conftest import FINE_TUNE_COMMON, SUITE_XLA_FLAGS, TWO_BLOCKS

BYTE = ByteTokenizer()


def _examples(tmp_path, n=12, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in rng.integers(0, 500, (n, 2))]
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_examples([build_source(SourceConfig(path=str(path)))], InstructConfig(), BYTE, seq_len=32)


@partial(jax.jit, static_argnums=0)
def _token_nll(model, params, batch):
    logits = model.apply(params, batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    return nll * batch["loss_mask"]


def test_packed_batch_gives_each_example_its_unpacked_loss(tmp_path):
    model = Model(from_dict(ModelConfig, TWO_BLOCKS))
    params = jax.jit(model.init)(jax.random.key(0))
    examples = _examples(tmp_path)
    packed = next(ExampleStream(examples, 3, 32, shuffle=False, epochs=1))
    assert packed["segment_ids"].max() >= 3
    per_token = np.asarray(_token_nll(model, params, packed))
    packed_losses = [per_token[r, packed["segment_ids"][r] == s].sum()
                     for r in range(3) for s in range(1, packed["segment_ids"][r].max() + 1)]
    alone = next(ExampleStream(examples, len(packed_losses), 32, shuffle=False, epochs=1, packing="pad"))
    alone_losses = np.asarray(_token_nll(model, params, alone)).sum(1)
    np.testing.assert_allclose(packed_losses, alone_losses, rtol=2e-5)


def test_accumulated_uneven_sft_micro_batches_equal_the_full_batch(tmp_path):
    model = Model(from_dict(ModelConfig, TWO_BLOCKS))
    params = jax.jit(model.init)(jax.random.key(1))
    batch = next(ExampleStream(_examples(tmp_path, n=24, seed=3), 4, 32, shuffle=False))
    tokens_per_micro = batch["loss_mask"].reshape(2, 2, -1).swapaxes(0, 1).sum((1, 2))
    assert tokens_per_micro[0] != tokens_per_micro[1]  # the two micro-batches hold different target counts
    loss_fn = causal_lm_loss(model)
    out = {}
    for accum in (1, 2):
        state = TrainState.create(params, optax.sgd(0.5), jax.random.key(0))
        step = make_train_step(loss_fn, optax.sgd(0.5), grad_accum=accum)
        state, metrics = step(state, None, {k: jnp.asarray(v) for k, v in batch.items()})
        out[accum] = (float(metrics["loss"]), state.params)
    assert out[1][0] == pytest.approx(out[2][0], rel=1e-6)
    for a, b in zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[2][1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _sft_job(directory, **extra):
    # a two-block tiny-llama (tests/conftest.py): how a LoRA / QLoRA run restores does not depend on the size
    job = {**FINE_TUNE_COMMON, "model": {"config": TWO_BLOCKS},
           "data": {"kind": "sft", "sources": [{"path": "builtin:gsm8k_train_slice.jsonl"}], "eval_fraction": 0.1,
                    "sft": {"columns": {"prompt": "question", "completion": "answer"},
                            "prompt_format": "Question: {prompt}\nAnswer: "}},
           "train": {"steps": 2, "batch_size": 4, "seq_len": 256, "eval_batches": 2},
           "checkpoint": {"directory": str(directory)}}
    for key, value in extra.items():
        job[key] = {**job.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(TrainJobConfig, job)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_peft_sft_checkpoint_evaluates_to_its_training_metrics(tmp_path, method):
    from jaxtune.job import run_eval_job, run_training

    extra = {"peft": {"lora": {"rank": 4, "targets": "all-linear"}}}
    if method == "qlora":
        extra["model"] = {"quant": {"kind": "nf4", "blocksize": 32}}
    job = _sft_job(tmp_path / "run", **extra)
    result = run_training(job)
    assert result.trainable_params < result.total_params / 10
    trained_eval = result.evals[-1]
    # the loss over the training run's evaluation batches (train.eval_batches; eval alone makes a full pass)
    restore = {"model": {"config": None, "checkpoint": str(tmp_path / "run")},
               "eval": {"tasks": [{"kind": "loss", "limit": 2}]}}
    if method == "lora":  # the same evaluation gives the one-device greedy generations the 8-device ones must match
        restore["eval"] = {"tasks": [{"kind": "loss", "limit": 2}, {"kind": "generate", "name": "gsm8k", "answer_pattern": "gsm8k", "limit": 4,
                                      "batch_size": 4, "max_new_tokens": 8}]}
    eval_job = _sft_job(tmp_path / "run", **restore)
    evaluated = run_eval_job(eval_job)
    assert evaluated["loss"]["loss"] == pytest.approx(trained_eval["loss"], rel=1e-5)
    assert evaluated["loss"]["tokens"] == trained_eval["tokens"]
    if method == "lora":
        _same_on_eight_devices(tmp_path, eval_job, evaluated)
    else:  # the recipe's own model.quant restores the run as trained; another quantization is refused
        from jaxtune.job import ModelSource, load_model
        from jaxtune.quant.weight import QuantConfig

        same = load_model(ModelSource(checkpoint=str(tmp_path / "run"), quant=QuantConfig(kind="nf4", blocksize=32)))
        as_trained = load_model(ModelSource(checkpoint=str(tmp_path / "run")))
        for a, b in zip(jax.tree.leaves(same[0]), jax.tree.leaves(as_trained[0])):
            np.testing.assert_array_equal(a, b)
        with pytest.raises(ValueError, match="differs from the quantization the run"):
            load_model(ModelSource(checkpoint=str(tmp_path / "run"), quant=QuantConfig(kind="int8", double_quant=False)))


def _same_on_eight_devices(tmp_path, job, single):
    """`jaxtune eval` of the eval ``job`` (the run, its loss and greedy generations) on a (2, 2, 2) mesh of
    8 CPU devices (a subprocess) reports ``single``, the same job's figures on one device: loss, and the
    same greedy generations."""
    import os
    from pathlib import Path
    import subprocess
    import sys

    import yaml

    from jaxtune.config.loader import to_dict

    spec = to_dict(job)
    spec["mesh"] = {"data": 2, "fsdp": 2, "tensor": 2}  # the one difference from ``job``
    config = tmp_path / "eval8.yaml"
    config.write_text(yaml.safe_dump(spec))
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {SUITE_XLA_FLAGS}"}
    proc = subprocess.run([sys.executable, "-m", "jaxtune.cli.main", "eval", "--json", str(config)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sharded["loss"]["loss"] == pytest.approx(single["loss"]["loss"], rel=1e-5)
    assert len(single["gsm8k"]["samples"]) == 4
    predictions = [[s["prediction"] for s in run["gsm8k"]["samples"]] for run in (sharded, single)]
    assert predictions[0] == predictions[1]
