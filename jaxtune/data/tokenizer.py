"""Tokenizers: built-in byte-level and character-level tokenizers, and local Hugging Face ones.

`ByteTokenizer` needs no files: ids 0-255 are UTF-8 bytes, then pad, bos, eos.
`CharTokenizer` maps each distinct character of a training text to an id (nanoGPT's
character-level setup); it is saved as ``jaxtune_tokenizer.json`` beside checkpoints.
`load_tokenizer(dir)` returns, from local files only (never the network): a transformers
tokenizer when the directory has one, the tokenizer described by ``jaxtune_tokenizer.json``
when it has that, else the byte tokenizer. It never runs code from a model directory: a
directory whose tokenizer_config.json or config.json maps classes to its own Python files
(``auto_map``) is refused, and transformers is called with ``trust_remote_code=False``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

BYTE_TOKENIZER_FILE = "jaxtune_tokenizer.json"
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_CODE_CONFIGS = ("tokenizer_config.json", "config.json")  # where transformers finds custom-code class maps


class ByteTokenizer:
    """UTF-8 bytes as tokens. vocab_size = 259: bytes 0-255, pad 256, bos 257, eos 258."""

    vocab_size = 259
    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    mask_token_id = None
    cls_token_id = None
    sep_token_id = None

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id] + ids if add_bos else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        (Path(directory) / BYTE_TOKENIZER_FILE).write_text(json.dumps({"kind": "byte", "vocab_size": self.vocab_size}))


class CharTokenizer:
    """One id per character, in sorted order of the characters seen in the training text.
    No special tokens; characters outside the vocabulary are an error naming them."""

    pad_token_id = None
    bos_token_id = None
    eos_token_id = None
    mask_token_id = None
    cls_token_id = None
    sep_token_id = None

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars or len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer: chars must be distinct single characters")
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError:
            bad = sorted({c for c in text if c not in self.index})
            raise ValueError(f"character tokenizer: {len(bad)} characters not in its vocabulary of "
                             f"{self.vocab_size}: {''.join(bad)[:40]!r}") from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids if 0 <= int(i) < self.vocab_size)

    def save(self, directory: str | Path) -> None:
        (Path(directory) / BYTE_TOKENIZER_FILE).write_text(json.dumps({"kind": "char", "chars": "".join(self.chars)}))


class HFTokenizer:
    """Thin adapter giving a transformers tokenizer the same encode/decode surface."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.pad_token_id = tokenizer.pad_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.mask_token_id = tokenizer.mask_token_id
        self.cls_token_id = tokenizer.cls_token_id
        self.sep_token_id = tokenizer.sep_token_id
        self._special_text: dict[int, Optional[str]] = {}

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return [self.bos_token_id] + ids if add_bos and self.bos_token_id is not None else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts in one call (fast tokenizers run the batch in Rust, in parallel)."""
        return self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def has_offsets(self) -> bool:
        """Whether tokens come with the character spans they cover (Rust-backed "fast" tokenizers)."""
        return bool(getattr(self.tokenizer, "is_fast", False))

    def encode_with_offsets(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, character span of each id) per text; needs `has_offsets`."""
        out = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [(list(ids), [tuple(span) for span in spans]) for ids, spans in zip(out["input_ids"], out["offset_mapping"])]

    def special_text(self, token_id: int) -> Optional[str]:
        """The text of an added (special) token that tokenizes back to exactly ``[token_id]`` inside
        any text, e.g. ``"</s>"``; None for an ordinary token or one that does not round-trip."""
        if token_id not in self._special_text:
            text = self.tokenizer.convert_ids_to_tokens(int(token_id))
            added = text in self.tokenizer.get_added_vocab() if isinstance(text, str) else False
            ok = added and self.tokenizer.encode(text, add_special_tokens=False) == [int(token_id)]
            self._special_text[token_id] = text if ok else None
        return self._special_text[token_id]

    def save(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(str(directory))


def has_hf_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / f).exists() for f in _HF_TOKENIZER_FILES)


def refuse_custom_code(directory: str | Path) -> None:
    """Raise (naming the file and the key) if ``directory``'s tokenizer_config.json or config.json
    has an ``auto_map``: classes defined by Python files shipped with the model, which jaxtune
    never imports or runs."""
    for name in _CODE_CONFIGS:
        path = Path(directory) / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        if auto_map:
            raise ValueError(f"{path}: auto_map names custom code ({', '.join(_code_files(auto_map)) or auto_map}); "
                             "jaxtune never runs code from a model directory (delete the auto_map entry to use "
                             "transformers' built-in classes)")


def _code_files(auto_map) -> list[str]:
    """The Python files an auto_map refers to: {"AutoTokenizer": ["tokenization_x.XTokenizer", null]} ->
    ["tokenization_x.py"] (a "repo--module.Class" reference keeps its repo)."""
    refs = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    names = []
    for ref in refs:
        for item in ref if isinstance(ref, (list, tuple)) else [ref]:
            if isinstance(item, str) and "." in item:
                names.append(item.rsplit(".", 1)[0] + ".py")
    return sorted(set(names))


def _saved_builtin(directory: Optional[str | Path]):
    path = None if directory is None else Path(directory) / BYTE_TOKENIZER_FILE
    if path is None or not path.exists():
        return None
    spec = json.loads(path.read_text())
    if spec.get("kind") == "char":
        return CharTokenizer(spec["chars"])
    if spec.get("kind") == "byte":
        return ByteTokenizer()
    raise ValueError(f"{path}: unknown tokenizer kind {spec.get('kind')!r}")


def load_tokenizer(directory: Optional[str | Path] = None, kind: str = "auto"):
    """kind: auto (HF files in ``directory``, else a saved built-in tokenizer, else bytes) | byte | char | hf.
    ``char`` needs a saved character vocabulary in ``directory`` (training builds it from the text)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        tokenizer = _saved_builtin(directory)
        if not isinstance(tokenizer, CharTokenizer):
            raise FileNotFoundError(f"tokenizer.kind=char but {directory} holds no character vocabulary ({BYTE_TOKENIZER_FILE})")
        return tokenizer
    if kind not in ("auto", "hf"):
        raise ValueError(f"tokenizer.kind: unknown kind {kind!r} (auto | byte | char | hf)")
    if kind == "auto" and directory is not None and not has_hf_tokenizer(directory):
        saved = _saved_builtin(directory)
        if saved is not None:
            return saved
    if directory is not None and has_hf_tokenizer(directory):
        refuse_custom_code(directory)
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False))
    if kind == "hf":
        raise FileNotFoundError(f"tokenizer.kind=hf but {directory} holds no tokenizer files ({', '.join(_HF_TOKENIZER_FILES)})")
    return ByteTokenizer()
