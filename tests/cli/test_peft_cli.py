"""`jaxtune convert` for PEFT runs: --merge-lora to a transformers checkpoint, the adapter alone
to a PEFT directory that `peft` loads, a PEFT adapter merged into its base, and `model.adapter`
putting a PEFT adapter onto a base for generate / eval. Logits checked against transformers."""

import numpy as np
import pytest

from jaxtune.cli.main import main
from jaxtune.config import from_dict
from jaxtune.interop import save_hf
from jaxtune.job import TrainJobConfig, load_model, run_training
from jaxtune.job.schema import ModelSource
from jaxtune.models import Model
from jaxtune.peft.core import base_model
from tests.conftest import TWO_BLOCKS, shared_directory
from tests.reference import require

torch = require("torch")
transformers = require("transformers")
peft = require("peft")

TOKENS = np.random.default_rng(0).integers(0, 259, (2, 12))


def _hf_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run and its base as a transformers checkpoint, made once per session."""

    def build(directory):
        run_training(from_dict(TrainJobConfig, {
            "model": {"config": TWO_BLOCKS}, "data": {"kind": "synthetic"},  # a two-block tiny-llama
            "peft": {"lora": {"rank": 4, "alpha": 8, "targets": ["all-linear"]}},
            "train": {"steps": 4, "batch_size": 4, "seq_len": 32, "eval_batches": 0},
            "optim": {"lr": 5e-2, "warmup_steps": 1, "schedule": "constant"},
            "checkpoint": {"directory": str(directory / "run")},
            "logging": {"progress": False, "tensorboard": False, "jsonl": False}}))
        params, cfg, _ = load_model(ModelSource(checkpoint=str(directory / "run")))
        save_hf(base_model(params), cfg, directory / "hf_base")

    run = shared_directory(tmp_path_factory, "peft_cli", build) / "run"
    params, cfg, _ = load_model(ModelSource(checkpoint=str(run)))
    logits = np.asarray(Model(cfg).apply(params, TOKENS))
    base_logits = np.asarray(Model(cfg).apply(base_model(params), TOKENS))
    assert np.abs(logits - base_logits).max() > 1e-2  # the adapter matters
    return run, run.parent / "hf_base", logits


def test_merge_lora_export_matches_transformers(lora_run, tmp_path, capsys):
    run, _, logits = lora_run
    assert main(["convert", "orbax-to-hf", str(run), str(tmp_path / "plain")]) == 1
    assert "--merge-lora" in capsys.readouterr().err
    assert main(["convert", "orbax-to-hf", str(run), str(tmp_path / "merged"), "--merge-lora"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(_hf_logits(merged), logits, atol=1e-4, rtol=0)


def test_adapter_export_loads_in_peft_and_imports_back(lora_run, tmp_path):
    run, hf_base, logits = lora_run
    assert main(["convert", "orbax-to-peft", str(run), str(tmp_path / "adapter")]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_base).eval()
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    np.testing.assert_allclose(_hf_logits(with_adapter), logits, atol=1e-4, rtol=0)

    # model.adapter: the same adapter put onto the HF base at load time
    params, cfg, _ = load_model(ModelSource(hf_dir=str(hf_base), adapter=str(tmp_path / "adapter")))
    np.testing.assert_allclose(np.asarray(Model(cfg).apply(params, TOKENS)), logits, atol=1e-5, rtol=0)

    # peft-to-hf: the adapter merged into its base
    assert main(["convert", "peft-to-hf", str(tmp_path / "adapter"), str(tmp_path / "merged"), "--base", str(hf_base)]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(_hf_logits(merged), logits, atol=1e-4, rtol=0)
    assert main(["generate", f"model.hf_dir={hf_base}", f"model.adapter={tmp_path / 'adapter'}",
                 "tokenizer.kind=byte", "sampling.max_new_tokens=3", "prompts=[hi]"]) == 0


def test_training_refuses_model_adapter_and_continues_from_peft_adapter(lora_run, tmp_path):
    run, hf_base, logits = lora_run
    main(["convert", "orbax-to-peft", str(run), str(tmp_path / "adapter")])
    common = {"data": {"kind": "synthetic"}, "train": {"steps": 1, "batch_size": 4, "seq_len": 32, "eval_batches": 0},
              "optim": {"lr": 1e-12, "warmup_steps": 0, "schedule": "constant"},
              "logging": {"progress": False, "tensorboard": False, "jsonl": False}}
    with pytest.raises(ValueError, match="peft.adapter"):
        run_training(from_dict(TrainJobConfig, {**common, "model": {"hf_dir": str(hf_base), "adapter": str(tmp_path / "adapter")}}))
    continued = tmp_path / "continued"
    result = run_training(from_dict(TrainJobConfig, {**common, "model": {"hf_dir": str(hf_base)},
                                                     "peft": {"adapter": str(tmp_path / "adapter")},
                                                     "checkpoint": {"directory": str(continued)}}))
    assert result.trainable_params < 0.1 * result.total_params
    cfg = load_model(ModelSource(hf_dir=str(hf_base)))[1]
    np.testing.assert_allclose(np.asarray(Model(cfg).apply(result.params, TOKENS)),
                               logits, atol=1e-5, rtol=0)  # lr ~0: the imported adapter, unchanged
    # the run restores as it trained (its recorded peft section names the adapter directory)
    restored, _, _ = load_model(ModelSource(checkpoint=str(continued)))
    np.testing.assert_allclose(np.asarray(Model(cfg).apply(restored, TOKENS)), logits, atol=1e-5, rtol=0)
