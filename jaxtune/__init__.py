"""jaxtune: pretrain, fine-tune and align decoder language models in JAX/Flax.

Models are pure functions over parameter pytrees (``jaxtune.models``); every
projection goes through one linear op (``jaxtune.ops.linear``) that dispatches
on the weight leaf's type; Hugging Face checkpoints go in and out through
``jaxtune.interop``; decoding is a jitted KV-cache loop (``jaxtune.generate``).
"""

__version__ = "0.1.0"

import sys as _sys  # noqa: E402

from jaxtune.utils.moved import MovedModules as _MovedModules  # noqa: E402

if not any(isinstance(finder, _MovedModules) for finder in _sys.meta_path):
    _sys.meta_path.append(_MovedModules())  # an import of a module that moved says where it went
