"""Jitted KV-cache decoding with greedy / temperature / top-k / top-p sampling."""

from jaxtune.generate.decode import Generation, generate, left_pad
from jaxtune.generate.sampling import SamplingConfig, filter_logits, sample_next

__all__ = ["Generation", "SamplingConfig", "filter_logits", "generate", "left_pad", "sample_next"]
