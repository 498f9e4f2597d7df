"""Tokenizers: a built-in byte-level tokenizer and local Hugging Face tokenizers.

`ByteTokenizer` needs no files: ids 0-255 are UTF-8 bytes, then pad, bos, eos.
`load_tokenizer(dir)` returns a transformers tokenizer from local files only
(never the network) when the directory has one, else the byte tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

BYTE_TOKENIZER_FILE = "jaxtune_tokenizer.json"
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class ByteTokenizer:
    """UTF-8 bytes as tokens. vocab_size = 259: bytes 0-255, pad 256, bos 257, eos 258."""

    vocab_size = 259
    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id] + ids if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        (Path(directory) / BYTE_TOKENIZER_FILE).write_text(json.dumps({"kind": "byte", "vocab_size": self.vocab_size}))


class HFTokenizer:
    """Thin adapter giving a transformers tokenizer the same encode/decode surface."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.pad_token_id = tokenizer.pad_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return [self.bos_token_id] + ids if add_bos and self.bos_token_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(str(directory))


def has_hf_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / f).exists() for f in _HF_TOKENIZER_FILES)


def load_tokenizer(directory: Optional[str | Path] = None, kind: str = "auto"):
    """kind: auto (HF files in ``directory`` if present, else bytes) | byte | hf."""
    if kind == "byte":
        return ByteTokenizer()
    if kind not in ("auto", "hf"):
        raise ValueError(f"tokenizer.kind: unknown kind {kind!r} (auto | byte | hf)")
    if directory is not None and has_hf_tokenizer(directory):
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(str(directory), local_files_only=True))
    if kind == "hf":
        raise FileNotFoundError(f"tokenizer.kind=hf but {directory} holds no tokenizer files ({', '.join(_HF_TOKENIZER_FILES)})")
    return ByteTokenizer()
