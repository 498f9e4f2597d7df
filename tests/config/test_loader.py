"""YAML + dotted overrides -> typed config; unknown keys and bad values name the key."""

import pytest

from jaxtune.config import ConfigError, load_config, to_dict
from jaxtune.config.loader import from_dict
from jaxtune.job import JobConfig
from jaxtune.models import ModelConfig


def write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "model:\n  preset: tiny-gpt2\nsampling:\n  top_k: 5\n")
    job = load_config(JobConfig, path, ["sampling.top_p=0.5", "sampling.temperature=1e-1", "prompts=[a, b]",
                                        "sampling.stop_tokens=[3, 4]", "model.dtype=bfloat16"])
    assert job.model.preset == "tiny-gpt2" and job.model.dtype == "bfloat16"
    assert job.sampling.top_k == 5 and job.sampling.top_p == 0.5 and job.sampling.temperature == 0.1
    assert job.prompts == ("a", "b") and job.sampling.stop_tokens == (3, 4)


def test_unknown_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'sampling.top_kk' \(did you mean 'sampling.top_k'\?\)"):
        load_config(JobConfig, None, ["sampling.top_kk=3"])
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config(JobConfig, write(tmp_path, "modle:\n  preset: x\n"))


@pytest.mark.parametrize("override, message", [
    ("sampling.top_k=many", "'sampling.top_k': expected an integer, got 'many'"),
    ("sampling.greedy=maybe", "'sampling.greedy': expected true or false"),
    ("model.dtype=float8", "'model.dtype': 'float8' is not one of"),
    ("sampling.top_p=1.5", "top_p must be in"),
    ("sampling.top_k.x=1", "'sampling.top_k' is a int, it has no sub-keys"),
    ("sampling", "not of the form key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(JobConfig, None, [override])


def test_model_source_needs_exactly_one(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of hf_dir, checkpoint, preset, config"):
        load_config(JobConfig, write(tmp_path, "model:\n  preset: tiny-llama\n"), ["model.hf_dir=/x"])


def test_inline_model_config_round_trips():
    cfg = ModelConfig(family="qwen3", qk_norm=True, eos_token_id=(1, 2), layer_types=("full", "full"),
                      sliding_window=8)
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    job = load_config(JobConfig, None, ["model.config.family=mistral", "model.config.rope.kind=llama3"])
    assert job.model.config.family == "mistral" and job.model.config.rope.kind == "llama3"


def test_string_overrides_are_kept_as_typed():
    job = load_config(JobConfig, None, ["prompts=0123", "tokenizer.path=~/tok", "model.preset=1.10"])
    assert job.prompts == ("0123",) and job.tokenizer.path == "~/tok" and job.model.preset == "1.10"
    job = load_config(JobConfig, None, ["prompts=[0123, yes]", "tokenizer.path=null"])
    assert job.prompts == ("0123", "yes") and job.tokenizer.path is None
    with pytest.raises(ConfigError, match="config key 'sampling.stop_tokens': cannot parse value"):
        load_config(JobConfig, None, ["sampling.stop_tokens=[1, 2"])


def test_every_shipped_config_loads():
    """Each YAML recipe in configs/ parses into its job tree (a typo in a shipped key fails here)."""
    from pathlib import Path

    from jaxtune.config import load_config
    from jaxtune.job import JobConfig, TrainJobConfig
    from jaxtune.job.label import LabelJobConfig

    shipped = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert len(shipped) >= 4
    for path in shipped:
        kinds = {"generate": JobConfig, "label": LabelJobConfig}
        load_config(kinds.get(path.name.split("_")[0], TrainJobConfig), path)
    speed = load_config(TrainJobConfig, shipped[0].with_name("pretrain_shakespeare_char_speedrun.yaml"))
    base = load_config(TrainJobConfig, shipped[0].with_name("pretrain_shakespeare_char.yaml"))
    # the speedrun keeps nanoGPT's model size, data, batch and context; only activation and schedule move
    assert speed.model.config.replace(activation="gelu") == base.model.config
    assert (speed.data, speed.train.batch_size, speed.train.seq_len) == (base.data, base.train.batch_size, base.train.seq_len)
