"""jaxtune: pretrain, fine-tune and align decoder language models in JAX/Flax.

Models are pure functions over parameter pytrees (``jaxtune.models``); every
projection goes through one linear op (``jaxtune.ops.linear``) that dispatches
on the weight leaf's type; Hugging Face checkpoints go in and out through
``jaxtune.interop``; decoding is a jitted KV-cache loop (``jaxtune.generate``).
"""

__version__ = "0.1.0"
