"""The CLI end to end: convert both ways (transformers loads the result), generate, estimate."""

import json
import subprocess
import sys

import numpy as np

from jaxtune.cli.main import main
from tests.reference import require

torch = require('torch')
transformers = require('transformers')


def test_convert_round_trip_through_orbax(hf_checkpoint, tmp_path, capsys):
    directory, torch_model = hf_checkpoint("qwen2")
    assert main(["convert", "hf-to-orbax", str(directory), str(tmp_path / "orbax")]) == 0
    assert (tmp_path / "orbax" / "model_config.json").exists()
    assert main(["convert", "orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf")]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    tokens = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(tokens).logits.numpy(), torch_model(tokens).logits.numpy())
    # refuses to overwrite, names the path
    assert main(["convert", "orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf")]) == 1
    assert "not empty" in capsys.readouterr().err


def save_char_tokenizer(directory):
    """A character-level HF tokenizer of 40 symbols (fits the test models' vocab of 97)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = list("abcdefghijklmnopqrstuvwxyz .,!?")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(directory)


def test_generate_from_hf_and_orbax_agree(hf_checkpoint, tmp_path, capsys):
    import shutil

    source, _ = hf_checkpoint("llama")
    directory = shutil.copytree(source, tmp_path / "with_tokenizer")
    save_char_tokenizer(directory)
    main(["convert", "hf-to-orbax", str(directory), str(tmp_path / "orbax")])
    assert (tmp_path / "orbax" / "tokenizer.json").exists()  # the tokenizer travels with the checkpoint
    capsys.readouterr()
    common = ["prompts=[abc, hello]", "sampling.greedy=true", "sampling.max_new_tokens=6", "--json"]
    assert main(["generate", f"model.hf_dir={directory}", *common]) == 0
    from_hf = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert main(["generate", f"model.checkpoint={tmp_path / 'orbax'}", *common]) == 0
    from_orbax = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(from_hf) == 2 and [r["tokens"] for r in from_hf] == [r["tokens"] for r in from_orbax]
    assert all(len(r["tokens"]) == len(r["log_probs"]) > 0 for r in from_hf)


def test_generate_demo_config_and_train_rejects_its_keys(capsys):
    assert main(["generate", "configs/generate_demo.yaml", "sampling.max_new_tokens=4"]) == 0
    assert "prompt 1" in capsys.readouterr().out
    assert main(["train", "configs/generate_demo.yaml"]) == 1
    assert "unknown config key 'prompts'" in capsys.readouterr().err


def test_estimate_counts_parameters_exactly(hf_checkpoint, capsys):
    directory, torch_model = hf_checkpoint("gpt2")
    assert main(["estimate", f"model.hf_dir={directory}", "--seq", "64"]) == 0
    out = capsys.readouterr().out
    assert f"parameters   {sum(p.numel() for p in torch_model.parameters()):,}" in out


def test_estimate_lowers_a_qlora_job_for_accelerators(capsys):
    """--lower: the job's programs lowered for TPU and CUDA from this CPU, with the fused kernels listed."""
    config = ("model.config={family: llama, vocab_size: 256, hidden_size: 128, num_layers: 1, num_heads: 4, "
              "num_kv_heads: 2, intermediate_size: 256}")
    assert main(["estimate", "configs/sft_qlora_llama_small.yaml", "model.checkpoint=null", config, "train.batch_size=2",
                 "train.seq_len=128", "--lower", "tpu,cuda"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    lowered = {(f[0], f[1]): " ".join(f[2:]) for f in lines if len(f) > 2 and f[0] in ("train", "eval", "decode")}
    assert sorted(lowered) == sorted((p, pl) for p in ("train", "eval", "decode") for pl in ("tpu", "cuda"))
    assert "tpu_custom_call:nf4_matmul_t_tpu" in lowered["train", "tpu"] and "triton:nf4_matmul_t" in lowered["train", "cuda"]
    assert "tpu_custom_call:nf4_matmul_tpu" in lowered["decode", "tpu"]


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "jaxtune.cli.main", "convert", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "hf-to-orbax" in out.stdout
