"""The README's "Fine-tune a Hugging Face model on your chats" walk-through, run as written on a tiny
Qwen2-style model (random weights, a byte-level BPE tokenizer with a ChatML template): the block
between the ``walkthrough`` markers is read from README.md and each line run in order, with fewer
steps and shorter rows added to the training commands (and ``BASE`` pointing at the tiny model)."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from jaxtune.cli.main import main
from tests.data.tokenizer_kinds import CHATML, build
from tests.reference import require

torch = require("torch")
transformers = require("transformers")
require("peft")

ROOT = Path(__file__).resolve().parents[2]
SHRINK = ["train.steps=2", "train.seq_len=256", "train.batch_size=2", "optim.warmup_steps=1", "model.dtype=float32",
          "logging.progress=false", "logging.tensorboard=false", "train.eval_every=2", "train.eval_batches=1",
          "checkpoint.every_steps=2",
          "eval.tasks=[{kind: loss}, {kind: generate, name: exact_match, max_new_tokens: 4, batch_size: 4, limit: 4}]"]
CHAT_INPUT = "What is 7 times 6?\nAnd 8 times 6?\n/exit\n"


def walkthrough_lines() -> list[str]:
    """The commands of the README's walk-through block, comments and blank lines left out."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- walkthrough:start -->\n```bash\n(.*?)```\n<!-- walkthrough:end -->", text, re.S)
    assert block is not None, "README.md lost its walk-through block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def tiny_chat_base(directory: Path) -> Path:
    """A random Qwen2-style HF model whose tokenizer has a ChatML template (EOS = <|im_end|>)."""
    build("byte_bpe", directory, chat_template=CHATML)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=True, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(directory)
    return directory


def _jaxtune(argv: list[str], monkeypatch, capsys) -> str:
    """One ``jaxtune`` command in process; -> its stdout (stderr is echoed for a failing run)."""
    argv = [str(ROOT / a) if a.startswith("configs/") else a for a in argv]
    if argv[0] == "train":
        argv += SHRINK
    if argv[0] == "chat":
        monkeypatch.setattr(sys, "stdin", io.StringIO(CHAT_INPUT))
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 0, f"jaxtune {' '.join(argv)} exited {status}:\n{err[-3000:]}"
    return out + err


def test_the_readme_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys):
    base = tiny_chat_base(tmp_path / "tiny-base")
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "BASE": str(base), "PYTHONPATH": str(ROOT)}
    outputs = []
    for line in walkthrough_lines():
        if line.startswith("BASE="):
            continue  # the tiny base stands in for the user's model
        if line.startswith("python "):
            done = subprocess.run(sys.executable + line[len("python"):], shell=True, cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
            outputs.append(done.stdout)
            continue
        assert line.startswith("jaxtune "), f"the walk-through has a line the test cannot run: {line}"
        outputs.append(_jaxtune(shlex.split(line.replace("$BASE", str(base)))[1:], monkeypatch, capsys))
    chats = [json.loads(row) for row in (tmp_path / "chats.jsonl").read_text().splitlines()]
    assert len(chats) == 256 and chats[0]["messages"][1]["role"] == "assistant"
    train_lora, train_qlora, evaluated = outputs[1], outputs[2], outputs[3]
    # the run explained itself before its first step
    assert re.search(r"data: \d+ training examples \([\d,]+ tokens\) per epoch; \d+ examples", train_lora)
    assert "base quantized: nf4" in train_qlora and "trains: PEFT (lora: rank 16" in train_qlora
    # eval without a config file used the run's own job: its held-out chats and tasks, with counts
    assert "the run's own job" in evaluated and "exact_match" in evaluated
    assert re.search(r"loss\s+examples\s+\d+", evaluated)
    adapter = json.loads((tmp_path / "exports/chat_adapter/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base.resolve())
    assert outputs[-1].strip() == "both load"
    # the QLoRA run's adapter records the quantization it trained against, and the export says how to load it
    said = _jaxtune(["convert", "orbax-to-peft", "runs/chat_qlora", "exports/chat_qadapter"], monkeypatch, capsys)
    assert "trained against the base quantized as nf4" in said and "BitsAndBytesConfig" in said and "--merge-lora" in said
    record = json.loads((tmp_path / "exports/chat_qadapter/jaxtune_adapter.json").read_text())
    assert record["quantization"]["kind"] == "nf4" and record["bitsandbytes"]["bnb_4bit_quant_type"] == "nf4"
    assert record["base"]["hf_dir"] == str(base)
