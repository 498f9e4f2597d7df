"""Issue 22, bad inputs: nothing runs code from a model directory, files are read only from inside
it, and every malformed input (safetensors, NaN weights, YAML, empty data) is one line naming the
file, key or tensor. Reproduced through the CLI (`jaxtune.cli.main.main`, in process) where a user
meets them; tiny models only."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxtune.align.losses import preference_losses
from jaxtune.cli import convert
from jaxtune.cli.main import main
from jaxtune.config import ConfigError, from_dict, load_config
from jaxtune.data.pipeline import DocumentOptions, DocumentStream
from jaxtune.data.source_base import SourceConfig
from jaxtune.data.sources import build_source
from jaxtune.data.tokenizer import ByteTokenizer, load_tokenizer
from jaxtune.interop import load_hf, save_hf
from jaxtune.interop.adapters import load_adapter
from jaxtune.job import TrainJobConfig, load_model, runmeta
from jaxtune.job.schema import ModelSource
from jaxtune.models import Model
from jaxtune.peft.lora import LoraWeight, apply_lora
from tests.reference import require

torch = require("torch")
transformers = require("transformers")
peft = require("peft")

# A llama small enough to build in a moment (the runs below stop before any step).
TINY = {"family": "llama", "vocab_size": 259, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
        "head_dim": 16, "intermediate_size": 48, "max_position_embeddings": 64, "bos_token_id": 257,
        "eos_token_id": [258], "pad_token_id": 256}


def fails(capsys, args: list[str]) -> str:
    """Run ``jaxtune ARGS``: it must exit 1 with exactly one line on stderr; -> that line."""
    capsys.readouterr()  # what fixtures printed before
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def save_tokenizer(directory):
    """A small transformers fast tokenizer (word-level over characters)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(directory)


def plant_custom_code(directory, config_file="tokenizer_config.json"):
    """auto_map in ``config_file`` naming tokenization_evil.py, which writes MARKER if imported."""
    (directory / "tokenization_evil.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('MARKER').write_text('custom code ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n"
        "class EvilTokenizerFast(PreTrainedTokenizerFast):\n    pass\n")
    path = directory / config_file
    config = json.loads(path.read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizerFast"]}
    if config_file == "tokenizer_config.json":
        config["tokenizer_class"] = "EvilTokenizerFast"
    path.write_text(json.dumps(config))


class SpyStdin(io.StringIO):
    """stdin that answers "y" (yes, run the code) and records that it was read."""

    def __init__(self):
        super().__init__("y\n")
        self.reads = 0

    def readline(self, *args):
        self.reads += 1
        return super().readline(*args)

    def read(self, *args):
        self.reads += 1
        return super().read(*args)


# --- item 1: no code from a model / tokenizer directory ----------------------------------------

def test_generate_refuses_a_tokenizer_with_custom_code_and_never_runs_it(hf_checkpoint, tmp_path, capsys, monkeypatch):
    """Item 1: a model directory whose tokenizer_config.json maps AutoTokenizer to its own Python
    file. Simulated: a stdin that would answer "y" to transformers' trust-remote-code prompt."""
    directory = shutil.copytree(hf_checkpoint("llama")[0], tmp_path / "model")
    save_tokenizer(directory)
    plant_custom_code(directory)
    stdin = SpyStdin()
    monkeypatch.setattr("sys.stdin", stdin)
    err = fails(capsys, ["generate", f"model.hf_dir={directory}", "prompts=[abc]", "sampling.max_new_tokens=2"])
    assert (f"{directory / 'tokenizer_config.json'}: auto_map names custom code (tokenization_evil.py); "
            "jaxtune never runs code from a model directory") in err
    assert not (directory / "MARKER").exists()
    assert stdin.reads == 0  # transformers never asked


def test_load_tokenizer_refuses_auto_map_in_config_json(tmp_path):
    """Item 1: the auto_map sits in the model's config.json (transformers reads it for the tokenizer class)."""
    save_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    plant_custom_code(tmp_path, "config.json")
    with pytest.raises(ValueError, match=r"config\.json: auto_map names custom code \(tokenization_evil\.py\)"):
        load_tokenizer(tmp_path)
    assert not (tmp_path / "MARKER").exists()


def test_transformers_is_called_with_trust_remote_code_false(tmp_path, monkeypatch):
    """Item 1: every from_pretrained jaxtune makes says trust_remote_code=False (never the prompt default)."""
    save_tokenizer(tmp_path)
    seen = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    assert load_tokenizer(tmp_path).encode("abc") == [3, 4, 5]
    assert seen and all(kw.get("trust_remote_code") is False for kw in seen)


# --- item 2: a sharded index names only files inside the directory ------------------------------

@pytest.fixture(scope="module")
def sharded(hf_checkpoint, tmp_path_factory):
    """The tiny llama re-saved in several shards with model.safetensors.index.json."""
    params, cfg = load_hf(hf_checkpoint("llama")[0])
    directory = tmp_path_factory.mktemp("sharded") / "model"
    save_hf(params, cfg, directory, max_shard_bytes=40_000)
    return directory


def _point_entry(directory, entry: str) -> str:
    """Rewrite the index so that its first tensor lives at ``entry``; -> that tensor's name."""
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = sorted(data["weight_map"])[0]
    data["weight_map"][name] = entry
    index.write_text(json.dumps(data))
    return name


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_index_entry_outside_the_directory_is_refused(sharded, tmp_path, capsys, kind):
    """Item 2: model.safetensors.index.json's weight_map points at ../other/..., an absolute path,
    or a shard that is a symlink to a file outside; the outside file is a valid shard, so before
    the fix it loaded."""
    directory = shutil.copytree(sharded, tmp_path / "m" / "model")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][sorted(index["weight_map"])[0]]
    outside = tmp_path / "m" / "other"
    outside.mkdir()
    shutil.copy(directory / shard, outside / shard)
    if kind == "symlink":
        (directory / shard).unlink()
        (directory / shard).symlink_to(outside / shard)
        entry = shard
        name = sorted(index["weight_map"])[0]
    else:
        entry = f"../other/{shard}" if kind == "parent" else str(outside / shard)
        name = _point_entry(directory, entry)
    err = fails(capsys, ["convert", "hf-to-orbax", str(directory), str(tmp_path / "orbax")])
    assert f"{directory / 'model.safetensors.index.json'}: weight_map entry {name!r}: {entry!r} lies outside" in err
    assert not (tmp_path / "orbax").exists()


def test_hub_cache_snapshot_links_still_load(sharded, tmp_path):
    """Item 2: the one allowed outside target, a Hugging Face cache snapshot whose files link to
    ../../blobs (simulated: the cache layout built by hand)."""
    repo = tmp_path / "models--me--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sharded.iterdir():
        shutil.copy(f, repo / "blobs" / f"sha-{f.name}")
        (snapshot / f.name).symlink_to(f"../../blobs/sha-{f.name}")
    params, _ = load_hf(snapshot)
    want, _ = load_hf(sharded)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, want))


# --- item 3: a malformed safetensors file is one line naming it ---------------------------------

@pytest.mark.parametrize("damage", ["truncated", "header_length"])
def test_malformed_safetensors_is_one_line_naming_the_file(hf_checkpoint, tmp_path, capsys, damage):
    """Item 3: model.safetensors cut short (an interrupted download), or its 8-byte header length garbage."""
    directory = shutil.copytree(hf_checkpoint("llama")[0], tmp_path / "model")
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else (2**40).to_bytes(8, "little") + data[8:])
    err = fails(capsys, ["convert", "hf-to-orbax", str(directory), str(tmp_path / "orbax")])
    assert f"jaxtune convert: error: {path}: not a readable safetensors file" in err


def test_malformed_adapter_safetensors_names_the_file(hf_checkpoint, tmp_path):
    """Item 3: the same for a PEFT adapter's adapter_model.safetensors."""
    params, cfg = load_hf(hf_checkpoint("llama")[0])
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                              "target_modules": ["q_proj"]}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: not a readable safetensors file"):
        load_adapter(params, cfg, tmp_path)


# --- item 4: NaN / inf weights ------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_nan_or_inf_weight_is_refused_naming_the_tensor(hf_checkpoint, tmp_path, capsys, bad):
    """Item 4: one element of one tensor is NaN / -inf (a diverged export); before, it loaded silently."""
    directory = shutil.copytree(hf_checkpoint("llama")[0], tmp_path / "model")
    path = directory / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = bad
    save_file(tensors, path, metadata={"format": "pt"})
    err = fails(capsys, ["convert", "hf-to-orbax", str(directory), str(tmp_path / "orbax")])
    assert f"{path}: tensor model.layers.0.mlp.up_proj.weight holds NaN or inf" in err


# --- item 5: YAML errors and duplicate keys -----------------------------------------------------

def test_malformed_yaml_is_one_line_with_file_line_and_column(tmp_path, capsys):
    """Item 5a: a YAML syntax error; before, a long traceback whose location said <unicode string>."""
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  preset: tiny-llama\ntrain:\n  steps: [3\n  batch_size: 4\n")
    err = fails(capsys, ["train", str(path)])
    assert f"jaxtune train: error: {path}:5:13: " in err and "<unicode string>" not in err


def test_duplicate_yaml_key_is_refused_naming_file_line_and_key(tmp_path, capsys):
    """Item 5b: the same key twice in one mapping; before, the last value silently won."""
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  preset: tiny-llama\ntrain:\n  steps: 3\n  batch_size: 4\n  steps: 300\n")
    err = fails(capsys, ["train", str(path)])
    assert f"{path}:6:3: duplicate key 'steps' (first given on line 4)" in err
    with pytest.raises(ConfigError, match=r"o\.yaml:1:16: duplicate key 'lr' \(first given on line 1\)"):
        load_config(TrainJobConfig, _write(tmp_path / "o.yaml", "optim: {lr: 1, lr: 2}\n"))
    with pytest.raises(ConfigError, match="duplicate key 'path'"):  # in an override's value too
        load_config(TrainJobConfig, None, ["data.sources=[{path: a.txt, path: b.txt}]"])
    # keys brought in by a merge (<<) may still be overridden
    job = load_config(TrainJobConfig, _write(tmp_path / "m.yaml", "train:\n  <<: {steps: 3, batch_size: 4}\n  steps: 5\n"))
    assert (job.train.steps, job.train.batch_size) == (5, 4)


def _write(path, text):
    path.write_text(text)
    return path


# --- items 6 and 9: rsLoRA export, and the --overwrite flag -------------------------------------

TOKENS = np.random.default_rng(0).integers(0, 97, (2, 10))


@pytest.fixture
def rslora_run(hf_checkpoint, tmp_path, monkeypatch):
    """An rsLoRA run (rank 4, alpha 8) on the tiny HF llama. Simulated: the run's restore
    (`load_model` in the convert command) returns the base with rsLoRA leaves of random B; the
    run directory holds the train_meta.json training writes (`runmeta.run_meta` of the job)."""
    hf_dir = hf_checkpoint("llama")[0]
    base, cfg = load_hf(hf_dir)
    job = from_dict(TrainJobConfig, {"model": {"hf_dir": str(hf_dir)}, "data": {"kind": "synthetic"},
                                     "peft": {"lora": {"rank": 4, "alpha": 8, "rslora": True,
                                                       "targets": ["all-linear"]}}})
    params = apply_lora(base, job.peft.lora, jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(1), 64))
    params = jax.tree.map(lambda x: dataclasses.replace(x, b=0.2 * jax.random.normal(next(keys), x.b.shape))
                          if isinstance(x, LoraWeight) else x, params, is_leaf=lambda x: isinstance(x, LoraWeight))
    run = tmp_path / "run"
    run.mkdir()
    (run / runmeta.TRAIN_META_FILE).write_text(json.dumps(runmeta.run_meta(job, None)))
    monkeypatch.setattr(convert, "load_model", lambda source: (params, cfg, run))
    return run, hf_dir, np.asarray(Model(cfg).apply(params, TOKENS))


def test_rslora_adapter_exports_use_rslora_and_its_alpha(rslora_run, tmp_path, capsys):
    """Item 9: `convert orbax-to-peft` of an rsLoRA run; before, use_rslora false and alpha 16 (the scale 8 / sqrt(4) times r)."""
    run, hf_dir, logits = rslora_run
    assert main(["convert", "orbax-to-peft", str(run), str(tmp_path / "adapter")]) == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["use_rslora"], config["lora_alpha"], config["r"]) == (True, 8, 4)
    assert not config["alpha_pattern"] and not config["rank_pattern"]
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        np.testing.assert_allclose(with_adapter(torch.tensor(TOKENS)).logits.numpy(), logits, atol=1e-4, rtol=0)
    params, cfg, _ = load_model(ModelSource(hf_dir=str(hf_dir), adapter=str(tmp_path / "adapter")))
    np.testing.assert_allclose(np.asarray(Model(cfg).apply(params, TOKENS)), logits, atol=1e-5, rtol=0)


def test_convert_refusal_names_the_cli_flag(rslora_run, tmp_path, capsys):
    """Item 6: converting into a non-empty directory; before, the message said `overwrite=True`,
    a Python keyword the CLI does not take."""
    run, _, _ = rslora_run
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    for direction in ("orbax-to-peft", "orbax-to-hf"):
        extra = ["--merge-lora"] if direction == "orbax-to-hf" else []
        err = fails(capsys, ["convert", direction, str(run), str(tmp_path / "out"), *extra])
        assert "not empty (pass --overwrite to replace its files)" in err and "overwrite=True" not in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# --- item 7: an evaluation / training file with no usable documents -----------------------------

EVAL_COMMON = [f"model.config={json.dumps(TINY)}", "tokenizer.kind=byte", "data.kind=documents",
               "train.batch_size=2", "train.seq_len=8"]


def _data(tmp_path):
    (tmp_path / "train.txt").write_text("hello world\nfoo bar baz\nmore text here\n")
    (tmp_path / "empty_rows.jsonl").write_text('{"text": ""}\n{"text": "   "}\n')
    return tmp_path / "train.txt", tmp_path / "empty_rows.jsonl"


def test_eval_file_without_usable_documents_is_an_error_naming_it(tmp_path, capsys):
    """Item 7: data.eval_sources is a file whose every row is empty, skipped by data.on_bad_row=skip;
    before, `eval` said only "the held-out stream produced no batches" (no file)."""
    train, empty = _data(tmp_path)
    err = fails(capsys, ["eval", *EVAL_COMMON, "data.on_bad_row=skip",
                         f"data.sources=[{{path: {train}, text_split: line}}]", f"data.eval_sources=[{{path: {empty}}}]"])
    assert f"data source {empty}: all 2 documents are bad rows (skipped: 2 empty)" in err


def test_training_with_an_empty_eval_file_stops_before_training(tmp_path, capsys):
    """Item 7: the same held-out file for `train`; before, the run trained 2 steps and never evaluated."""
    train, empty = _data(tmp_path)
    err = fails(capsys, ["train", *EVAL_COMMON, "data.on_bad_row=skip", "train.steps=2", "train.eval_every=1",
                         f"checkpoint.directory={tmp_path / 'run'}", "logging.progress=false",
                         "logging.tensorboard=false", f"data.sources=[{{path: {train}, text_split: line}}]",
                         f"data.eval_sources=[{{path: {empty}}}]"])
    assert f"data source {empty}: all 2 documents are bad rows" in err


def test_training_source_of_only_bad_rows_is_an_error_not_a_hang(tmp_path):
    """Item 7: every training document is a skipped bad row; before, the reader cycled epochs
    forever looking for one (simulated at the stream level, where the hang was)."""
    _, empty = _data(tmp_path)
    stream = DocumentStream([build_source(SourceConfig(path=str(empty)))], [1.0], ByteTokenizer(), batch_size=2,
                            seq_len=8, options=DocumentOptions(on_bad_row="skip"))
    with pytest.raises(ValueError, match=f"data source {empty}: all 2 documents are bad rows"):
        next(stream)


def test_empty_eval_text_file_names_its_key(tmp_path, capsys):
    """Item 7: data.eval_path is an empty file; before, the error blamed data.path."""
    train, _ = _data(tmp_path)
    (tmp_path / "empty.txt").write_text("\n")
    err = fails(capsys, ["eval", f"model.config={json.dumps(TINY)}", "tokenizer.kind=byte", "data.kind=text",
                         f"data.path={train}", f"data.eval_path={tmp_path / 'empty.txt'}"])
    assert f"data.eval_path: {tmp_path / 'empty.txt'} is empty" in err


# --- item 8: ORPO's log(1 - exp(x)) near x = 0 --------------------------------------------------

def _orpo64(x: float, y: float, beta: float) -> tuple[float, float, float]:
    """ORPO loss and its gradients in float64 closed form, one-token completions (mean = sum)."""
    log1mexp = lambda v: math.log(-math.expm1(v))  # noqa: E731  exact in float64
    log_odds = (x - y) - (log1mexp(x) - log1mexp(y))
    sig_neg = 1.0 / (1.0 + math.exp(log_odds))  # σ(-log_odds)
    dodds = lambda v: 1.0 + math.exp(v) / -math.expm1(v)  # noqa: E731  d log_odds / dx (and -d/dy)
    loss = -x + beta * math.log1p(math.exp(-log_odds))
    return loss, -1.0 - beta * sig_neg * dodds(x), beta * sig_neg * dodds(y)


@pytest.mark.parametrize("x", [-1e-4, -1e-6])
def test_orpo_is_exact_in_float32_as_the_mean_log_prob_nears_zero(x):
    """Item 8: chosen mean log-prob x near 0, where float32 1 - exp(x) cancels; before, the loss
    was off by 2e-5 (x = -1e-4) and 1e-3 (x = -1e-6) relative."""
    y, beta = -0.7, 0.5
    fn = lambda c, r: preference_losses("orpo", c, r, beta=beta, chosen_tokens=jnp.float32(1),  # noqa: E731
                                        rejected_tokens=jnp.float32(1))
    loss, (g_c, g_r) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(jnp.float32(x), jnp.float32(y))
    want, want_c, want_r = _orpo64(x, y, beta)
    assert loss.dtype == jnp.float32
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(g_c) == pytest.approx(want_c, rel=1e-5)
    assert float(g_r) == pytest.approx(want_r, rel=1e-5)
    # the whole range stays finite, gradients too (the unused branch leaks no NaN)
    xs = jnp.asarray([-30.0, -1.0, -0.6931, -0.69316, -1e-3, -1e-7], jnp.float32)
    losses, grads = jax.jit(jax.vmap(jax.value_and_grad(fn), (0, None)))(xs, jnp.float32(y))
    assert bool(jnp.isfinite(losses).all()) and bool(jnp.isfinite(grads).all())
