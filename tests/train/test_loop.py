"""The loop end to end: exact resume after SIGKILL, SIGTERM save, corrupt-checkpoint fallback,
the non-finite stop, logs, and `jaxtune train` / `jaxtune eval`."""

import dataclasses
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxtune.checkpoint.manager import restore_params
from jaxtune.cli.main import main
from jaxtune.config import from_dict, to_dict
from jaxtune.data.streams import SyntheticStream
from jaxtune.job import TrainJobConfig, run_training
from jaxtune.models import Model, ModelConfig
from jaxtune.models.presets import preset
from jaxtune.parallel import MeshConfig, make_mesh
from jaxtune.train.config import TrainConfig
from jaxtune.train.loop import NonFiniteLossError, train
from jaxtune.train.stopping import PREEMPTED_EXIT_CODE
from jaxtune.train.losses import causal_lm_loss
from jaxtune.train.optim import OptimConfig, build_optimizer
from tests.conftest import TWO_BLOCKS, TWO_BLOCKS_ARGS
from tests.train.resume_worker import job

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def _losses(result, steps):
    by_step = {h["step"]: h["loss"] for h in result.history}
    return np.array([by_step[s] for s in steps])


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    full = run_training(job(None))
    assert [h["step"] for h in full.history] == list(range(1, 21))

    ckpt = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("resume_worker.py")), str(ckpt)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [10]

    resumed = run_training(job(str(ckpt)))
    assert resumed.resumed_from == 10
    assert [h["step"] for h in resumed.history] == list(range(11, 21))
    np.testing.assert_array_equal(_losses(resumed, range(11, 21)), _losses(full, range(11, 21)))
    # The whole train state matches: params, optimizer moments, step, RNG, skip counters.
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(full.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Resuming a finished run does no more steps.
    again = run_training(job(str(ckpt)))
    assert again.resumed_from == 20 and again.history == []


def test_several_steps_per_call_equal_single_steps(tmp_path):
    """train.steps_per_call=4: the same losses, metrics and final state as one step per call, with
    calls cut at the evaluation at step 6 and ending at the save of step 10: 4 + 2, then 4."""

    def with_calls(cfg, n):
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps_per_call=n, eval_every=6,
                                                                  eval_batches=1))

    single = run_training(with_calls(job(None, steps=10), 1))  # no checkpoints: they change nothing computed
    multi = run_training(with_calls(job(str(tmp_path / "multi"), steps=10), 4))
    assert [h["step"] for h in multi.history] == list(range(1, 11))
    for a, b in zip(single.history, multi.history):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)], rtol=2e-6, atol=1e-7)
    assert [e["step"] for e in multi.evals] == [e["step"] for e in single.evals] == [6, 10]
    for a, b in zip(jax.tree.leaves(single.state), jax.tree.leaves(multi.state)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-6)
    assert sorted(int(p.name) for p in (tmp_path / "multi").iterdir() if p.name.isdigit()) == [10]


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
    ckpt = tmp_path / "run"
    first = run_training(job(str(ckpt)))
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [10, 20]
    for f in (ckpt / "20" / "params" / "d").iterdir():  # the array bytes of step 20
        f.write_bytes(f.read_bytes()[:7])
    with pytest.warns(UserWarning, match="20"):
        resumed = run_training(job(str(ckpt)))
    assert resumed.resumed_from == 10
    np.testing.assert_array_equal(_losses(resumed, range(11, 21)), _losses(first, range(11, 21)))


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    ckpt = tmp_path / "run"
    args = ["train", "train.steps=100000", *TWO_BLOCKS_ARGS, "train.batch_size=4", "train.seq_len=32",
            "train.log_every=1", f"checkpoint.directory={ckpt}", "checkpoint.every_steps=1000000",
            "logging.progress=false", "logging.tensorboard=false"]
    proc = subprocess.Popen([sys.executable, "-m", "jaxtune.cli.main", *args], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = ckpt / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "preempted" in out
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    assert len(steps) == 1 and steps[0] >= 3
    logged = [json.loads(line)["step"] for line in log.read_text().splitlines() if "train/loss" in line]
    assert logged[-1] == steps[0]  # saved exactly where it stopped
    # The same command resumes from there.
    assert main([*args[:1], f"train.steps={steps[0] + 2}", *args[2:]]) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in lines if "train/loss" in r][-2:] == [steps[0] + 1, steps[0] + 2]


def poisonable_loss(model):
    """The causal LM loss, made NaN for batches whose ``poison`` flag is set."""
    base = causal_lm_loss(model)

    def loss_fn(params, batch, rng):
        total, weight, metrics = base(params, batch, rng)
        return total * jax.numpy.where(batch["poison"][0, 0] > 0, jax.numpy.nan, 1.0), weight, metrics

    return loss_fn


class PoisonedStream(SyntheticStream):
    """Batches from index 3 on carry a flag that makes the loss NaN."""

    def batch_at(self, index):
        batch = super().batch_at(index)
        batch["poison"] = np.full(batch["tokens"].shape, int(index >= 3), np.int32)
        return batch


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path):
    cfg = from_dict(ModelConfig, TWO_BLOCKS)  # a two-block tiny-llama (tests/conftest.py)
    model = Model(cfg)
    loss_fn = poisonable_loss(model)

    tc = TrainConfig(steps=20, batch_size=2, seq_len=16, max_nonfinite_in_row=3, log_every=1)
    opt, sched = build_optimizer(OptimConfig(lr=1e-3), tc.steps)
    seen = []
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        train(loss_fn=loss_fn, params=model.init, model_cfg=cfg, optimizer=opt, schedule=sched, cfg=tc,
              batches=PoisonedStream(2, 16, cfg.vocab_size), mesh=make_mesh(MeshConfig()),
              callbacks=[lambda step, m: seen.append((step, m["finite"], m["skipped"]))])
    assert seen == [(1, 1.0, 0.0), (2, 1.0, 0.0), (3, 1.0, 0.0), (4, 0.0, 1.0), (5, 0.0, 2.0), (6, 0.0, 3.0)]


def test_train_and_eval_cli_with_logs(tmp_path, capsys):
    ckpt = tmp_path / "run"
    common = ["train.batch_size=4", "train.seq_len=32", "train.eval_batches=2", "logging.progress=false"]
    assert main(["train", "configs/train_demo.yaml", "train.steps=6", "train.eval_every=3", "train.log_every=2", "optim.warmup_steps=1",
                 f"checkpoint.directory={ckpt}", "checkpoint.every_steps=3", *common]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "done: step 6" in out and "eval loss" in out
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(Model(preset("tiny-llama")).init(jax.random.key(0))))
    assert f"trainable params: {total:,} of {total:,} (100.0000%)" in captured.err
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 0, "params/trainable": total, "params/total": total}.items() <= records[0].items()
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == [2, 4, 6]
    logged = [r for r in records if "train/loss" in r]
    assert all({"train/lr", "train/grad_norm", "train/skipped"} <= r.keys() for r in logged)
    # Throughput is reported for windows without compilation (not the first one).
    assert "train/tokens_per_s" not in logged[0] and all("train/tokens_per_s" in r for r in logged[1:])
    assert [r["step"] for r in records if "compile/first_step_s" in r] == [1]
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(r["eval/perplexity"] == pytest.approx(np.exp(r["eval/nll"]), rel=1e-6) for r in evals)
    assert list(ckpt.glob("events.out.tfevents.*"))
    assert (ckpt / "model_config.json").exists()

    assert main(["eval", "--json", "configs/train_demo.yaml", f"model.checkpoint={ckpt}", *common]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]
    assert metrics["loss"] == pytest.approx(evals[-1]["eval/loss"], rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(np.exp(metrics["nll"]), rel=1e-6)


def test_bad_train_config_names_the_key(capsys):
    assert main(["train", "train.stepz=3"]) == 1
    assert "train.steps" in capsys.readouterr().err
    assert main(["train", "train.batch_size=6", "train.grad_accum=4"]) == 1
    assert "grad_accum" in capsys.readouterr().err


def test_lr_schedule_does_not_advance_on_skipped_steps():
    cfg = from_dict(ModelConfig, TWO_BLOCKS)  # a two-block tiny-llama (tests/conftest.py)
    model = Model(cfg)
    loss_fn = poisonable_loss(model)

    class TwoBad(SyntheticStream):
        def batch_at(self, index):
            batch = super().batch_at(index)
            batch["poison"] = np.full(batch["tokens"].shape, int(index in (2, 3)), np.int32)
            return batch

    tc = TrainConfig(steps=6, batch_size=2, seq_len=16, log_every=1)
    opt, sched = build_optimizer(OptimConfig(lr=1.0, warmup_steps=10, schedule="constant"), tc.steps)
    result = train(loss_fn=loss_fn, params=model.init, model_cfg=cfg, optimizer=opt, schedule=sched, cfg=tc,
                   batches=TwoBad(2, 16, cfg.vocab_size), mesh=make_mesh(MeshConfig()))
    # lr of the update each step would apply: warmup 0, .1, .2 (skipped), .2 (skipped), .2, .3
    assert [round(h["lr"], 6) for h in result.history] == [0.0, 0.1, 0.2, 0.2, 0.2, 0.3]
    assert [h["finite"] for h in result.history] == [1, 1, 0, 0, 1, 1]


def test_rank_one_batch_fields_and_keep_best_through_the_loop(tmp_path):
    """A loss with a per-row weight [batch] (as reward / preference losses have) runs sharded, and
    keep-best keeps the step with the best evaluation."""
    from jaxtune.checkpoint.manager import CheckpointConfig, TrainCheckpointer

    cfg = from_dict(ModelConfig, TWO_BLOCKS)  # a two-block tiny-llama (tests/conftest.py)
    model = Model(cfg)
    base = causal_lm_loss(model)

    def loss_fn(params, batch, rng):
        total, weight, metrics = base(params, batch, rng)
        return total * batch["row_weight"][0], weight, metrics

    class Weighted(SyntheticStream):
        def batch_at(self, index):
            batch = super().batch_at(index)
            batch["row_weight"] = np.ones((batch["tokens"].shape[0],), np.float32)
            return batch

    evals = iter([3.0, 1.0, 2.0, 5.0])  # eval/loss at steps 2, 4, 6, 8: step 4 is the best

    def fake_eval_stream():
        value = next(evals)

        class One:
            def __iter__(self):
                batch = Weighted(4, 16, cfg.vocab_size, seed=9).batch_at(0)
                batch["row_weight"] = batch["row_weight"] * value / 5.0
                yield batch
        return One()

    ckpt = TrainCheckpointer(CheckpointConfig(directory=str(tmp_path / "run"), every_steps=2, keep_last=1, keep_best=1,
                                              async_save=False))
    tc = TrainConfig(steps=8, batch_size=4, seq_len=16, eval_every=2, eval_batches=1)
    opt, sched = build_optimizer(OptimConfig(lr=1e-3), tc.steps)
    result = train(loss_fn=loss_fn, params=model.init, model_cfg=cfg, optimizer=opt, schedule=sched, cfg=tc,
                   batches=Weighted(4, 16, cfg.vocab_size), mesh=make_mesh(MeshConfig()),
                   eval_batches=fake_eval_stream, checkpointer=ckpt)
    ckpt.close()
    assert [e["step"] for e in result.evals] == [2, 4, 6, 8]
    assert sorted(int(p.name) for p in (tmp_path / "run").iterdir() if p.name.isdigit()) == [4, 8]


def test_resume_refuses_another_model_or_trainable_split(tmp_path):
    ckpt = tmp_path / "run"
    run_training(job(str(ckpt), steps=10))
    other = from_dict(TrainJobConfig, {**to_dict(job(str(ckpt), steps=12)), "model": {"preset": "tiny-gpt2"}})
    with pytest.raises(ValueError, match="another model"):
        run_training(other)
    partial = from_dict(TrainJobConfig, {**to_dict(job(str(ckpt), steps=12)),
                                         "train": {**to_dict(job(None).train), "steps": 12, "trainable": ["mlp/"]}})
    with pytest.raises(ValueError, match="trainable"):
        run_training(partial)


def test_partially_trainable_run_checkpoints_only_its_trainable_half(tmp_path, capsys):
    ckpt = tmp_path / "run"
    common = ["train.batch_size=4", "train.seq_len=32", "logging.progress=false", "optim.warmup_steps=1"]
    assert main(["train", "train.steps=3", "train.trainable=[mlp/]", f"checkpoint.directory={ckpt}", *common]) == 0
    with pytest.raises(ValueError, match="only the trainable params"):
        restore_params(ckpt, jax.eval_shape(Model(preset("tiny-llama")).init, jax.random.key(0)))
    # eval rebuilds the frozen half from the run's base model (recorded in train_meta.json)
    assert main(["eval", "--json", f"model.checkpoint={ckpt}", *common, "train.eval_batches=1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]["tokens"] > 0
    from jaxtune.job import ModelSource, load_model

    params, _, _ = load_model(ModelSource(checkpoint=str(ckpt)))
    base = jax.jit(Model(preset("tiny-llama")).init)(jax.random.key(0))  # as the loop builds it
    assert np.array_equal(params["layers_0"]["attn"]["q_proj"]["kernel"], base["layers_0"]["attn"]["q_proj"]["kernel"])
    assert not np.array_equal(params["layers_0"]["mlp"]["up_proj"]["kernel"], base["layers_0"]["mlp"]["up_proj"]["kernel"])


def test_shakespeare_char_recipe_trains_evaluates_and_generates(tmp_path, capsys):
    """The shipped pretraining config end to end, shortened: the character vocabulary is saved
    beside the checkpoint, eval reproduces the run's val loss, generate decodes characters."""
    ckpt = tmp_path / "run"
    short = ["train.steps=4", "train.eval_every=4", "train.eval_batches=3", "logging.progress=false",
             "optim.warmup_steps=1"]
    assert main(["train", "configs/pretrain_shakespeare_char.yaml", f"checkpoint.directory={ckpt}", *short]) == 0
    capsys.readouterr()
    assert json.loads((ckpt / "jaxtune_tokenizer.json").read_text())["kind"] == "char"
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    val = [r["eval/loss"] for r in records if "eval/loss" in r]
    assert len(val) == 1 and 3.0 < val[0] < 4.5  # ~ln(65) = 4.17 after 4 steps
    assert main(["eval", "--json", "configs/pretrain_shakespeare_char.yaml", f"model.checkpoint={ckpt}", *short,
                 "eval.tasks=[{kind: loss, limit: 3}]"]) == 0  # the training run's 3 evaluation batches
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]["loss"] == pytest.approx(val[0], rel=1e-6)
    assert main(["generate", f"model.checkpoint={ckpt}", "model.preset=null", 'prompts=["ROMEO:"]',
                 "sampling.max_new_tokens=8", "--json"]) == 0
    out = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][0])
    assert len(out["tokens"]) == 8 and len(out["completion"]) == 8
