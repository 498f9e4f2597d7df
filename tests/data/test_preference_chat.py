"""TRL's conversational preference rows (lists of messages, explicit or implicit prompt): rendered
texts equal TRL's ``maybe_apply_chat_template``, token ids equal TRL's ``DPOTrainer`` dataset
preparation, bad rows are named, and ``jaxtune train`` runs DPO on such a file.

Tokenizers: byte-level BPE with a ChatML template, Metaspace ``LlamaTokenizer`` s with a Llama-2
template that renders their BOS (`tests.data.tokenizer_kinds`), and the byte-level BPE without a
template (the built-in ChatML)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
from datasets import Dataset, disable_progress_bars
from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt
from trl.trainer.dpo_trainer import DPOTrainer

from jaxtune.data.preference import PreferenceConfig, load_pairs, pair_of
from jaxtune.data.sources import SourceConfig, build_source
from jaxtune.data.tokenizer import load_tokenizer
from tests.data import tokenizer_kinds as K

SYSTEM = {"role": "system", "content": "Be brief."}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


HISTORY = [SYSTEM, user("What is two and two?"), assistant("It is four."), user("Count down from twelve.")]
ROWS = [  # explicit prompts (one turn, multi-turn, a two-turn completion), then implicit ones
    {"prompt": [user("What is two and two?")], "chosen": [assistant("It is four.")],
     "rejected": [assistant("It is five.")]},
    {"prompt": HISTORY, "chosen": [assistant("Twelve, eleven.")], "rejected": [assistant("No.")]},
    {"prompt": [user("Hello there!")], "chosen": [assistant("Hello."), user("yes?"), assistant("Be brief.")],
     "rejected": [assistant("Go away.")]},
    {"chosen": [user("Hello there!"), assistant("Hello.")], "rejected": [user("Hello there!"), assistant("no")]},
    {"chosen": HISTORY + [assistant("Twelve, eleven, ten.")], "rejected": HISTORY + [assistant("yes no")]},
]
KINDS = {"byte_bpe": K.CHATML, "metaspace_first": K.LLAMA2, "metaspace_always": K.LLAMA2}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """kind -> (jaxtune tokenizer, Hugging Face tokenizer with the kind's chat template)."""
    root = tmp_path_factory.mktemp("chat_tokenizers")
    out = {}
    for kind, template in KINDS.items():
        tokenizer = load_tokenizer(K.build(kind, root / kind, chat_template=template))
        out[kind] = tokenizer, tokenizer.tokenizer
    return out


def _source(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build_source(SourceConfig(path=str(path)))


def _trl_texts(row, hf) -> tuple[str, str, str]:
    out = maybe_apply_chat_template(maybe_extract_prompt(row), hf)
    return out["prompt"], out["chosen"], out["rejected"]


def _trl_dpo_ids(row, hf) -> tuple[list, list, list]:
    """TRL's DPOTrainer dataset preparation (prompt extraction, chat-template tokenization, the prompt
    where the tokenized prompt and prompt + completion part) run on one row."""
    disable_progress_bars()
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    out = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=hf), Dataset.from_list([row]), hf, args,
                                      "train")[0]
    return out["prompt_ids"], out["chosen_ids"], out["rejected_ids"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_rendered_texts_equal_trl_apply_chat_template(tokenizers, kind):
    tokenizer, hf = tokenizers[kind]
    for i, row in enumerate(ROWS):
        pair = pair_of(row, f"rows.jsonl:{i + 1}", PreferenceConfig(), tokenizer)
        assert (pair.prompt, pair.chosen, pair.rejected) == _trl_texts(row, hf), row
        assert pair.template == "tokenizer"
    if kind == "metaspace_first":  # the Llama template renders the BOS into the prompt text
        assert pair.prompt.startswith(hf.bos_token) and pair.chosen.endswith(" " + hf.eos_token)


def test_a_tokenizer_without_a_template_renders_the_built_in_chatml(tmp_path, tokenizers):
    _, with_chatml = tokenizers["byte_bpe"]
    bare = load_tokenizer(K.build("byte_bpe", tmp_path / "bare"))
    for i, row in enumerate(ROWS):
        pair = pair_of(row, f"rows.jsonl:{i + 1}", PreferenceConfig(format="conversational"), bare)
        assert (pair.prompt, pair.chosen, pair.rejected) == _trl_texts(row, with_chatml)
        assert pair.template == "chatml"


@pytest.mark.parametrize("kind", list(KINDS))
def test_token_ids_equal_trl_dpo_tokenization(tmp_path, tokenizers, kind, capsys):
    tokenizer, hf = tokenizers[kind]
    pairs = load_pairs([_source(tmp_path / "rows.jsonl", ROWS)], PreferenceConfig(), tokenizer, seq_len=256)
    assert "conversational pairs rendered with the tokenizer's chat template" in capsys.readouterr().err
    assert len(pairs.examples) == len(ROWS) and not pairs.counts
    for row, pair in zip(ROWS, pairs.examples):
        got = (pair.prompt.tolist(), pair.chosen.tolist(), pair.rejected.tolist())
        assert got == _trl_dpo_ids(row, hf), row
    eos = load_pairs([_source(tmp_path / "rows.jsonl", ROWS[:1])], PreferenceConfig(), tokenizer, seq_len=256,
                     add_eos=True).examples[0]
    assert eos.chosen[-1] == hf.eos_token_id and eos.chosen[:-1].tolist() == pairs.examples[0].chosen.tolist()


def test_the_system_prompt_opens_prompts_without_one(tokenizers):
    tokenizer, hf = tokenizers["byte_bpe"]
    cfg = PreferenceConfig(system_prompt="Be brief.")
    plain = {"prompt": HISTORY[1:], "chosen": ROWS[1]["chosen"], "rejected": ROWS[1]["rejected"]}
    assert pair_of(plain, "x:1", cfg, tokenizer) == pair_of(ROWS[1], "x:1", PreferenceConfig(), tokenizer)
    own = {**ROWS[1], "prompt": [{"role": "system", "content": "Shout."}] + HISTORY[1:]}
    assert pair_of(own, "x:1", cfg, tokenizer).prompt.startswith("<|im_start|>system\nShout.<|im_end|>")


def test_bad_rows_are_named_and_malformed_pairs_counted(tmp_path, tokenizers):
    tokenizer, _ = tokenizers["byte_bpe"]
    good = ROWS[0]
    bad = [
        ({**good, "chosen": [{"role": "assistant"}]}, r"chosen message 0 must be an object with 'role' and 'content'"),
        ({**good, "rejected": "It is five."}, r"field 'rejected' must be a non-empty list of messages"),
        ({**good, "chosen": []}, r"field 'chosen' must be a non-empty list of messages .*, got an empty list"),
        ({**good, "prompt": [user(3)]}, r"prompt message 0: content is a int, not text"),
    ]
    for row, message in bad:
        source = _source(tmp_path / "data.jsonl", [good, good, row])
        with pytest.raises(ValueError, match=r"data\.jsonl:3: " + message):
            load_pairs([source], PreferenceConfig(), tokenizer, seq_len=256)
    malformed = [{"chosen": [user("Hi"), assistant("a")], "rejected": [user("Hello"), assistant("b")]},  # no shared turn
                 {**good, "rejected": good["chosen"]},  # identical
                 {**good, "chosen": [assistant(" ")]},  # no text
                 {"chosen": [user("Hi"), assistant("a")], "rejected": [user("Hi"), assistant("a"), user("more")]}]
    rows = [good, *malformed, *(row for row, _ in bad)]
    pairs = load_pairs([_source(tmp_path / "mixed.jsonl", rows)], PreferenceConfig(), tokenizer, seq_len=256,
                       on_bad_row="skip")
    assert len(pairs.examples) == 1
    assert dict(pairs.counts) == {"no_shared_prefix": 1, "identical": 1, "empty": 2, "not_a_record": 1, "not_text": 3}


def test_a_generation_prompt_the_conversation_lacks_is_cut_as_trl_cuts_it(tmp_path):
    """A template whose generation prompt opens a block the finished turn does not have (DeepSeek-R1's
    ``<think>``): the prompt text is the part both renderings share (TRL's rule)."""
    thinks = K.CHATML.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}")
    assert thinks != K.CHATML
    tokenizer = load_tokenizer(K.build("byte_bpe", tmp_path / "tok", chat_template=thinks))
    for i, row in enumerate(ROWS):
        pair = pair_of(row, f"rows.jsonl:{i + 1}", PreferenceConfig(), tokenizer)
        assert (pair.prompt, pair.chosen, pair.rejected) == _trl_texts(row, tokenizer.tokenizer)
        assert pair.prompt.endswith("<|im_start|>assistant\n") and "<think>" not in pair.chosen


def test_a_template_that_rewrites_the_prompt_names_the_row(tmp_path):
    rewrites = ("{% for m in messages %}{{ m['role'] }}{% if loop.last %}(last){% endif %}: {{ m['content'] }}\n"
                "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    tokenizer = load_tokenizer(K.build("byte_bpe", tmp_path / "tok", chat_template=rewrites))
    with pytest.raises(ValueError, match=r"data\.jsonl:2: the rendering of prompt \+ chosen does not start with"):
        load_pairs([_source(tmp_path / "data.jsonl", [{"prompt": "p", "chosen": " a", "rejected": " b"}, ROWS[0]])],
                   PreferenceConfig(), tokenizer, seq_len=256)


def test_dpo_trains_on_a_conversational_file(tmp_path, tokenizers, capsys):
    from jaxtune.cli.main import main

    tokenizer_dir = K.build("byte_bpe", tmp_path / "tokenizer", chat_template=K.CHATML)
    data = tmp_path / "chat_pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    run = tmp_path / "run"
    config = tmp_path / "dpo.yaml"
    config.write_text(f"""
model:
  config: {{family: llama, vocab_size: 512, hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 2,
           head_dim: 16, intermediate_size: 64, max_position_embeddings: 256}}
  attention_impl: dpa
tokenizer: {{kind: hf, path: '{tokenizer_dir}'}}
objective: {{kind: dpo, preference: {{beta: 0.1}}}}
data: {{kind: preference, sources: [{{path: '{data}'}}]}}
train: {{steps: 3, batch_size: 4, seq_len: 128, eval_batches: 0, log_every: 1}}
optim: {{lr: 1.0e-3, warmup_steps: 1, schedule: constant}}
logging: {{progress: false, tensorboard: false, directory: '{run}'}}
""")
    assert main(["train", str(config)]) == 0
    assert "conversational pairs rendered with the tokenizer's chat template" in capsys.readouterr().err
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    assert len(history) == 3 and all(np.isfinite(h["train/loss"]) for h in history)
    assert history[0]["train/loss"] == pytest.approx(np.log(2), rel=1e-5)  # the policy starts as its reference
    # the loss is weighted by pairs, and the logs count pairs, not tokens
    assert history[0]["train/pairs"] == 4 and "train/pairs_per_s" in history[1] and "train/tokens" not in history[1]
