"""Data: tokenizers (batching, packing and datasets arrive with the data pipeline)."""

from jaxtune.data.tokenizer import ByteTokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "load_tokenizer"]
