"""Small Hugging Face tokenizers of the kinds jaxtune meets, trained here on a few sentences:
byte-level BPE (GPT-2 / Qwen style), and transformers' own `LlamaTokenizer` (Metaspace, BPE with
byte fallback, BOS added by its post-processor) with ``prepend_scheme`` "first" (legacy=False,
Llama-2 / Mistral in transformers 5) and "always" (legacy=True). Each has the special tokens
that ChatML and Llama-3 templates use."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

KINDS = ("byte_bpe", "metaspace_first", "metaspace_always")
TEMPLATE_TOKENS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CORPUS = [
    "Be brief. What is two and two? It is four. Twelve, eleven, ten. Hello there! The answer is twelve.",
    "user assistant system question answer: yes no. Count down from twelve: Twelve, eleven.",
] * 40


def _metaspace_vocab():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=480, special_tokens=["<unk>", "<s>", "</s>"] + bytes_))
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def build(kind: str, directory: Path, chat_template: str | None = None) -> Path:
    """Save a tokenizer of ``kind`` (KINDS) to ``directory``; -> the directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    if kind == "byte_bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    elif kind in ("metaspace_first", "metaspace_always"):
        vocab, merges = _metaspace_vocab()
        hf = LlamaTokenizer(vocab=vocab, merges=merges, legacy=kind == "metaspace_always", add_bos_token=True)
    else:
        raise ValueError(kind)
    hf.add_tokens(TEMPLATE_TOKENS, special_tokens=True)
    if hf.bos_token_id is not None and hf("x")["input_ids"][0] != hf.bos_token_id:
        raise AssertionError(f"{kind}: the tokenizer does not add its BOS")
    if chat_template is not None:
        hf.chat_template = chat_template
    directory.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(directory))
    return directory


def trl_template(name: str) -> str:
    """A chat template TRL ships (``trl/chat_templates/NAME.jinja``), e.g. its training templates
    with ``{% generation %}`` blocks."""
    return (resources.files("trl") / "chat_templates" / f"{name}.jinja").read_text()


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# ChatML whose generation block ends at <|im_end|>: the newline after it is not trained
CHATML_MARKED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
                 "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{{ '\\n' }}"
                 "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama-2 style: BOS, [INST] ... [/INST], the answer after a space, EOS; the system turn inside the first [INST]
LLAMA2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
          "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}<<SYS>>\n{{ messages[0]['content'] }}\n<</SYS>>\n\n"
          "{% endif %}{{ m['content'] }} [/INST]{% elif m['role'] == 'assistant' %} {{ m['content'] }} {{ eos_token }}"
          "{% endif %}{% endfor %}")
