"""Lowers shipped recipes for accelerators on 8 fake CPU devices (run by tests/job/test_lowering.py
in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8); prints one JSON line per
recipe: {"config", "lowered": {"program/platform": {kernel: count}}, "skipped", "error"}.

Each recipe is shrunk to small shapes with the same structure: its model family and layout (read
from the recipe that writes the checkpoint it starts from, or the preset of the HF model it names),
numerics, attention implementation, quantization, PEFT, objective, remat, grad_accum and mesh axes;
1 layer (2 where layers alternate), hidden 128, 4 heads, feed-forward 256, vocabulary <= 512,
batch 8 x grad_accum rows of 128 tokens.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import yaml

from jaxtune.config import load_config
from jaxtune.job import TrainJobConfig
from jaxtune.job.plan import without_text_init
from jaxtune.job.lowering import PROGRAMS, LoweringError, lower_job
from jaxtune.models.presets import preset

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
# HF directories named by recipes -> the preset with their architecture (nothing is read from disk)
HF_ARCHITECTURES = {"Meta-Llama-3.1-8B": "llama-3.1-8b", "Qwen2.5-7B": "qwen2.5-7b", "Qwen2.5-0.5B-Instruct": "qwen2.5-7b"}
# JAX's cuDNN attention looks for cuDNN while tracing, so it cannot be lowered without a GPU: a recipe
# asking for it is lowered with the Pallas GPU kernel (flash) instead
NOT_LOWERABLE_HERE = {"cudnn": "flash"}


def producers() -> dict[str, Path]:
    """checkpoint directory -> the recipe that writes it."""
    out = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        directory = (yaml.safe_load(path.read_text()) or {}).get("checkpoint", {}) or {}
        if isinstance(directory, dict) and directory.get("directory"):
            out[str(directory["directory"]).rstrip("/")] = path
    return out


def base_config(job: TrainJobConfig, made_by: dict[str, Path]):
    source = job.model
    if source.config is not None or source.preset is not None:
        return source.config if source.config is not None else preset(source.preset)
    if source.hf_dir is not None:
        return preset(HF_ARCHITECTURES[Path(source.hf_dir).name])
    producer = made_by[str(source.checkpoint).rstrip("/")]
    return base_config(load_config(TrainJobConfig, str(producer), []), made_by)


def shrunk(job: TrainJobConfig, made_by: dict[str, Path]) -> TrainJobConfig:
    cfg = base_config(job, made_by)
    layers = 2 if len(set(cfg.layer_types)) > 1 else 1
    small = cfg.replace(hidden_size=128, num_layers=layers, num_heads=4, num_kv_heads=2 if cfg.num_kv_heads < cfg.num_heads else 4,
                        head_dim=32, intermediate_size=256, vocab_size=min(cfg.vocab_size, 512),
                        max_position_embeddings=max(cfg.max_position_embeddings, 128), layer_types=cfg.layer_types[:layers],
                        bos_token_id=None, eos_token_id=(), pad_token_id=None)
    numerics = {}
    if job.model.attention_impl in NOT_LOWERABLE_HERE:
        numerics["attention_impl"] = NOT_LOWERABLE_HERE[job.model.attention_impl]
    model = dataclasses.replace(job.model, checkpoint=None, hf_dir=None, preset=None, config=small, adapter=None,
                                **numerics)
    train = dataclasses.replace(job.train, batch_size=8 * job.train.grad_accum, seq_len=128)
    # a prompt initialised from text: its ids are the recipe's tokenizer's (not at hand, and larger than
    # the shrunk vocabulary); the step's shapes do not depend on the init
    return dataclasses.replace(job, model=model, train=train, peft=without_text_init(job.peft))


def recipe(name: str) -> tuple[TrainJobConfig, tuple[str, ...]]:
    """The recipe as a training job and the programs it runs: a generation recipe (``generate``,
    ``label``: a model and prompts) runs decode steps of its model (``model`` / ``policy``)."""
    data = yaml.safe_load((CONFIGS / name).read_text())
    if "prompts" not in data:
        return load_config(TrainJobConfig, str(CONFIGS / name), []), PROGRAMS
    model = data.get("model") or data["policy"]
    return load_config(TrainJobConfig, None, [f"model={json.dumps(model)}"]), ("decode",)


def quant_kernel_rows(text: str) -> list[int]:
    """Rows of the first operand of every fused quantized-matmul call in a lowered module: per device
    when the kernel runs in shard_map on each device's rows."""
    return sorted({int(m.group(1)) for line in text.splitlines() if "_matmul" in line and "tpu_custom_call" in line
                   for m in [re.search(r"\} : \(tensor<(\d+)x", line)] if m})


def main(names: list[str]) -> None:
    made_by = producers()
    for name in names:
        record: dict = {"config": name, "lowered": {}}
        try:
            job, programs = recipe(name)
            for lowered in lower_job(shrunk(job, made_by), ("cuda", "tpu"), programs=programs):
                record["lowered"][f"{lowered.program}/{lowered.platform}"] = dict(lowered.kernels)
                if (lowered.program, lowered.platform) == ("train", "tpu"):
                    record["quant_kernel_rows"] = quant_kernel_rows(lowered.text)
        except LoweringError as err:
            record["error"] = f"{name}: {err}"
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
