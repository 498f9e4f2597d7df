"""Training rows are the token ids the reference libraries build, for byte-level BPE and for
transformers' Metaspace `LlamaTokenizer` (prepend_scheme "first" and "always", BOS added by its
post-processor):

- chats: ids equal ``apply_chat_template(messages, tokenize=True)``; targets equal transformers'
  ``return_assistant_tokens_mask`` where the template has ``{% generation %}`` blocks (TRL's
  Qwen2.5 and Llama-3 training templates, a ChatML variant whose newline after ``<|im_end|>`` is
  outside the block), else each assistant turn from where the tokenized generation prompt leaves
  the tokenized chat to where the tokenized chat through that turn does (TRL's rule, per turn);
- prompt/completion rows: TRL's SFT tokenization (``tokenizer(prompt + completion + eos)``, the
  completion where it leaves ``tokenizer(prompt)``), completions with and without a leading space;
- preference pairs: TRL's DPO tokenization (the same rule, the prompt shared by both sides).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from trl.data_utils import common_prefix_length

from jaxtune.data.instruct import InstructConfig
from jaxtune.data.preference import PreferenceConfig, load_pairs
from jaxtune.data.sft import load_examples
from jaxtune.data.sources import SourceConfig, build_source
from jaxtune.data.tokenizer import load_tokenizer
from tests.data import tokenizer_kinds as K

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two and two?"},
    {"role": "assistant", "content": "It is four."},
    {"role": "user", "content": "Count down from twelve."},
    {"role": "assistant", "content": "Twelve, eleven."},
]
CHAT_NO_SYSTEM = CHAT[1:3]
TEMPLATES = {
    "chatml": K.CHATML,
    "llama2": K.LLAMA2,
    "chatml_marked": K.CHATML_MARKED,
    "trl_qwen2_5_training": K.trl_template("qwen2_5_training"),
    "trl_llama3_training": K.trl_template("llama3_training"),
}
ROWS = [  # prompt / completion: with and without a leading space, across a BPE merge
    {"prompt": "Count down from twelve:", "completion": " Twelve, eleven."},
    {"prompt": "Count down from twelve: ", "completion": "Twelve, eleven."},
    {"prompt": "Q: What is two and two?\nA:", "completion": "It is four."},
    {"prompt": "The answer is tw", "completion": "elve."},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizer_kinds")
    return {kind: K.build(kind, root / kind) for kind in K.KINDS}


def _with_template(directory, template):
    tokenizer = load_tokenizer(directory)
    tokenizer.tokenizer.chat_template = template
    return tokenizer


def _source(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build_source(SourceConfig(path=str(path)))


def _prefix_rule_mask(hf, messages, full):
    """TRL's common-prefix rule applied to each assistant turn of a template without markers."""
    mask = np.zeros(len(full), int)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = hf.apply_chat_template(messages[:i], tokenize=True, return_dict=True, add_generation_prompt=True)
        through = hf.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=True)
        mask[common_prefix_length(before["input_ids"], full): common_prefix_length(through["input_ids"], full)] = 1
    return mask


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("kind", K.KINDS)
def test_chat_rows_equal_the_template_tokenized_by_transformers(tmp_path, tokenizers, kind, template, capsys):
    tokenizer = _with_template(tokenizers[kind], TEMPLATES[template])
    hf = tokenizer.tokenizer
    chats = [CHAT, CHAT_NO_SYSTEM]
    examples = load_examples([_source(tmp_path, [{"messages": c} for c in chats])], InstructConfig(), tokenizer,
                             seq_len=512, add_eos=False).examples
    marked = any(tag in TEMPLATES[template] for tag in ("{% generation %}", "{%- generation %}"))
    said = capsys.readouterr().err  # the job's log names the rule that chose the targets
    assert ("{% generation %} blocks (as transformers'" in said) == marked and "targets: assistant turns" in said, said
    for chat, example in zip(chats, examples):
        reference = hf.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=marked)
        full = list(reference["input_ids"])
        assert example.tokens.tolist() == full, (hf.convert_ids_to_tokens(example.tokens.tolist()),
                                                 hf.convert_ids_to_tokens(full))
        mask = reference["assistant_masks"] if marked else _prefix_rule_mask(hf, chat, full)
        np.testing.assert_array_equal(example.trained.astype(int), mask)
        trained = hf.decode([t for t, m in zip(full, mask) if m])
        for turn in (m["content"] for m in chat if m["role"] == "assistant"):
            assert turn in trained


@pytest.mark.parametrize("kind", K.KINDS)
def test_prompt_completion_rows_equal_trl_sft(tmp_path, tokenizers, kind):
    tokenizer = load_tokenizer(tokenizers[kind])
    hf = tokenizer.tokenizer
    bos = hf.bos_token_id is not None  # the Llama tokenizers add BOS; TRL tokenizes with special tokens
    examples = load_examples([_source(tmp_path, ROWS)], InstructConfig(), tokenizer, seq_len=256, add_bos=bos,
                             add_eos=True).examples
    for row, example in zip(ROWS, examples):
        prompt_ids = hf(text=row["prompt"])["input_ids"]
        full = hf(text=row["prompt"] + row["completion"] + hf.eos_token)["input_ids"]
        n = common_prefix_length(prompt_ids, full)
        assert example.tokens.tolist() == full, row
        assert example.trained.tolist() == [False] * n + [True] * (len(full) - n), row


@pytest.mark.parametrize("kind", K.KINDS)
def test_preference_pairs_equal_trl_dpo(tmp_path, tokenizers, kind):
    tokenizer = load_tokenizer(tokenizers[kind])
    hf = tokenizer.tokenizer
    rows = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"][:-1] + "!"} for r in ROWS]
    rows.append({"prompt": "Count down from twelve:", "chosen": " Twelve, eleven.", "rejected": "Ten."})
    pairs = load_pairs([_source(tmp_path, rows)], PreferenceConfig(), tokenizer, seq_len=256,
                       add_bos=hf.bos_token_id is not None, add_eos=True).examples
    assert len(pairs) == len(rows)
    for row, pair in zip(rows, pairs):
        prompt_ids = hf(text=row["prompt"])["input_ids"]
        chosen = hf(text=row["prompt"] + row["chosen"] + hf.eos_token)["input_ids"]
        rejected = hf(text=row["prompt"] + row["rejected"] + hf.eos_token)["input_ids"]
        n = min(common_prefix_length(prompt_ids, chosen), common_prefix_length(prompt_ids, rejected))
        assert pair.prompt.tolist() == chosen[:n], row
        assert pair.chosen.tolist() == chosen[n:] and pair.rejected.tolist() == rejected[n:], row
