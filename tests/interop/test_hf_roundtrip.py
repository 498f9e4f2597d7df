"""HF -> jaxtune -> HF reproduces identical tensors and loads in transformers; bad checkpoints are named."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxtune.interop import CheckpointMismatchError, UnsupportedModelError, load_hf, save_hf
from jaxtune.interop.hf_weights import SafetensorsReader
from tests.hf_reference import CONFIGS
from tests.reference import require

torch = require('torch')
transformers = require('transformers')


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_identical_and_loadable(hf_checkpoint, tmp_path, name):
    directory, torch_model = hf_checkpoint(name)
    params, cfg = load_hf(directory)
    out = save_hf(params, cfg, tmp_path / "export")
    original, exported = SafetensorsReader(directory), SafetensorsReader(out)
    assert original.names() == exported.names()
    for tensor in original.names():
        np.testing.assert_array_equal(original.get(tensor), exported.get(tensor), err_msg=tensor)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokens = torch.randint(3, 97, (2, 10))
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(tokens).logits.numpy(), torch_model(tokens).logits.numpy(), atol=1e-5)


def test_sharded_export_and_load(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("llama")
    params, cfg = load_hf(directory)
    out = save_hf(params, cfg, tmp_path / "sharded", max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again, _ = load_hf(out)
    np.testing.assert_array_equal(np.asarray(again["lm_head"]["kernel"]), np.asarray(params["lm_head"]["kernel"]))
    transformers.AutoModelForCausalLM.from_pretrained(out)


def test_bf16_export(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("qwen2")
    params, cfg = load_hf(directory)
    out = save_hf(params, cfg, tmp_path / "bf16", dtype="bfloat16")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    again, cfg16 = load_hf(out, param_dtype="bfloat16")
    assert str(again["embed"]["embedding"].dtype) == "bfloat16"


def _copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("llama")
    bad = _copy_checkpoint(directory, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        load_hf(bad)


def test_unexpected_tensor_is_named(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("llama")
    bad = _copy_checkpoint(directory, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match="unexpected tensors.*model.layers.0.extra.weight"):
        load_hf(bad)


def test_shape_disagreement_is_named(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("qwen3")
    bad = _copy_checkpoint(directory, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 80
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=r"'model.layers.0.mlp.gate_proj.weight'.*\(64, 96\).*\(64, 80\)"):
        load_hf(bad)


def test_unsupported_architecture_and_field(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("llama")
    bad = _copy_checkpoint(directory, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    with pytest.raises(UnsupportedModelError, match="model_type='falcon'"):
        load_hf(bad)
    (bad / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}))
    with pytest.raises(UnsupportedModelError, match="rope_type='yarn'"):
        load_hf(bad)


def test_pickle_checkpoints_are_refused(tmp_path, hf_checkpoint):
    directory, _ = hf_checkpoint("llama")
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are refused"):
        load_hf(tmp_path)


def test_bare_model_checkpoint_loads(hf_checkpoint, tmp_path):
    """A LlamaModel (no LM head, no 'model.' prefix) checkpoint with tied embeddings loads."""
    directory, _ = hf_checkpoint("llama_bias")  # tied
    bare = _copy_checkpoint(directory, tmp_path / "bare")
    tensors = load_file(bare / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, bare / "model.safetensors",
              metadata={"format": "pt"})
    params, _ = load_hf(bare)
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"]), tensors["model.embed_tokens.weight"])


def test_export_refuses_to_overwrite(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("gpt2")
    params, cfg = load_hf(directory)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        save_hf(params, cfg, tmp_path / "x")


def test_overwrite_removes_earlier_shards(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("llama")
    params, cfg = load_hf(directory)
    save_hf(params, cfg, tmp_path / "x", max_shard_bytes=60_000)
    changed = dict(params, final_norm={"scale": params["final_norm"]["scale"] * 2})
    save_hf(changed, cfg, tmp_path / "x", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["config.json", "model.safetensors"]
    again, _ = load_hf(tmp_path / "x")
    np.testing.assert_array_equal(np.asarray(again["final_norm"]["scale"]), np.asarray(changed["final_norm"]["scale"]))
