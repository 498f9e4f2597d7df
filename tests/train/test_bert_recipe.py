"""The BERT recipe, shrunk: its shipped WordPiece tokenizer, MLM + NSP pre-training on a slice of
tiny Shakespeare (configs/bert_shakespeare_nsp.yaml), `jaxtune eval` reporting MLM and NSP figures,
export to transformers' BertForPreTraining with the same logits, then classification fine-tuning
(configs/bert_classify_colours.yaml), full and LoRA, from the pre-training run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.cli.main import main
from jaxtune.job.assemble import load_model
from jaxtune.job.schema import ModelSource
from jaxtune.models import Model
from jaxtune.models.heads import nsp_logits
from tests.conftest import SUITE_XLA_FLAGS
from tests.reference import require

ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE = ROOT / "jaxtune" / "data" / "assets" / "tinyshakespeare.txt"
SMALL = ["model.config.hidden_size=32", "model.config.num_heads=2", "model.config.num_kv_heads=2",
         "model.config.head_dim=16", "model.config.intermediate_size=64"]
QUIET = ["logging.progress=false", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A shrunk pre-training run: the temporary root, the run's directory and the job's arguments."""
    root = tmp_path_factory.mktemp("bert")
    text = root / "slice.txt"
    text.write_text("".join(SHAKESPEARE.read_text().splitlines(keepends=True)[:2500]))
    run = root / "pretrain"
    data = f"data.sources=[{{path: '{text}', text_split: paragraph}}]"
    config = str(ROOT / "configs" / "bert_shakespeare_nsp.yaml")
    tokenizer = ROOT / "configs" / "tokenizers" / "shakespeare_wordpiece_2k"
    args = [config, f"tokenizer.path={tokenizer}", data, f"checkpoint.directory={run}", *QUIET]
    assert main(["train", *args, *SMALL, "train.steps=40", "train.seq_len=48", "train.batch_size=16",
                 "train.eval_every=0", "optim.warmup_steps=5"]) == 0
    return root, run, args


def test_pretraining_reports_mlm_and_nsp(pretrained, capsys):
    _, run, args = pretrained
    capsys.readouterr()
    assert main(["eval", "--json", *args, f"model.checkpoint={run}", "train.seq_len=48", "train.batch_size=16"]) == 0
    loss = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]
    assert {"mlm_loss", "masked_accuracy", "nsp_loss", "nsp_accuracy"} <= set(loss)
    assert 0.0 <= loss["nsp_accuracy"] <= 1.0 and loss["mlm_loss"] < np.log(2000)  # learnt something of the MLM
    assert loss["loss"] == pytest.approx(loss["mlm_loss"] + loss["nsp_loss"], rel=1e-5)


def test_pretraining_run_exports_to_transformers(pretrained, tmp_path):
    torch = require("torch")
    transformers = require("transformers")
    root, run, _ = pretrained
    assert main(["convert", "orbax-to-hf", str(run), str(tmp_path / "hf")]) == 0
    hf = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    enc = tok(["Before we proceed any further,", "Speak, speak."], ["hear me speak.", "You are all resolved."],
              padding=True, return_tensors="np")
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in enc.items()})
    params, cfg, _ = load_model(ModelSource(checkpoint=str(run), attention_impl="xla"))
    m = Model(cfg)
    hidden, _ = m.hidden(params, jnp.asarray(enc["input_ids"], jnp.int32),
                         segment_ids=jnp.asarray(enc["attention_mask"], jnp.int32),
                         token_types=jnp.asarray(enc["token_type_ids"], jnp.int32))
    real = enc["attention_mask"].astype(bool)
    assert np.abs(np.asarray(m.logits(params, hidden))[real] - ref.prediction_logits.numpy()[real]).max() <= 1e-4
    np.testing.assert_allclose(np.asarray(nsp_logits(m, params, hidden)), ref.seq_relationship_logits.numpy(),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("peft", [False, True])
def test_classification_fine_tuning_from_the_pretraining_run(pretrained, tmp_path, capsys, peft):
    _, run, _ = pretrained
    config = str(ROOT / "configs" / "bert_classify_colours.yaml")
    extra = ["peft.lora.rank=4", "peft.lora.targets=[all-linear]", "optim.lr=5e-3"] if peft else ["optim.lr=2e-3"]
    common = [f"model.checkpoint={run}", f"checkpoint.directory={tmp_path / 'cls'}", *QUIET]
    assert main(["train", config, "train.steps=40", *extra, *common]) == 0
    assert "nsp head(s) are not used by this objective" in capsys.readouterr().err
    assert main(["eval", "--json", config, f"model.checkpoint={tmp_path / 'cls'}", *QUIET]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["classify"]["examples"] == 120
    assert results["classify"]["accuracy"] >= 0.6  # three balanced classes: chance is 1/3


def test_memory_estimate_traces_the_objectives_batches(pretrained, capsys):
    """`jaxtune estimate` traces each objective's own batch layout (token types, NSP labels, row
    masks, class labels), not only the language-model one."""
    _, run, args = pretrained
    assert main(["estimate", *args, *SMALL]) == 0
    assert main(["estimate", str(ROOT / "configs" / "bert_classify_colours.yaml"), f"model.checkpoint={run}"]) == 0
    assert capsys.readouterr().out.count("peak") >= 2


def test_pretraining_step_sharded_on_eight_devices_equals_one_device(pretrained, tmp_path):
    """The shrunk recipe for 6 steps on a (data 2, fsdp 2, tensor 2) mesh of 8 CPU devices (a
    subprocess) and on this process's one device: the same losses (BERT's declared sharding: token
    types, pooler, NSP head and MLM transform included)."""
    _, _, args = pretrained  # config, tokenizer, data: the shrunk recipe's own arguments
    steps = ["train.steps=6", "train.seq_len=48", "train.batch_size=16", "train.log_every=1", "train.eval_every=0",
             "optim.warmup_steps=2", "checkpoint.every_steps=100"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS":
           f"--xla_force_host_platform_device_count=8 --xla_cpu_collective_timeout_seconds=600 {SUITE_XLA_FLAGS}"}
    runs = {}
    for name, mesh in (("sharded", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]), ("single", [])):
        run = tmp_path / name
        argv = ["train", *args[:3], f"checkpoint.directory={run}", *QUIET, *SMALL, *steps, *mesh]
        if mesh:
            proc = subprocess.run([sys.executable, "-m", "jaxtune.cli.main", *argv], env=env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
        else:
            assert main(argv) == 0
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [(h["train/loss"], h["train/nsp_accuracy"]) for h in lines if "train/loss" in h]
    assert len(runs["single"]) == 6
    np.testing.assert_allclose(runs["sharded"], runs["single"], rtol=1e-4, atol=1e-5)
