"""Data: tokenizers, batch streams and embedded assets (packing and datasets arrive with the data pipeline)."""

from jaxtune.data.tokenizer import ByteTokenizer, CharTokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "CharTokenizer", "load_tokenizer"]
