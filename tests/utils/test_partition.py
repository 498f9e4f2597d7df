"""The trainable/frozen partition: train.trainable patterns are regexes over param paths (not the
target presets of PEFT and quantization), quantized kernels never train, split and join invert."""

import jax
import numpy as np
import pytest

from jaxtune.models import Model
from jaxtune.models.presets import preset
from jaxtune.quant import QuantConfig, quantize
from jaxtune.utils.partition import count, join, mask_by_regex, split
from jaxtune.utils.tree import keypath_str

PARAMS = jax.eval_shape(Model(preset("tiny-llama").replace(num_layers=1)).init, jax.random.key(0))


def _marked(mask):
    return sorted(keypath_str(p) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m)


def test_patterns_are_plain_regexes():
    """'mlp' selects every path containing mlp (the norm before it too), not the mlp kernels of the
    'mlp' target preset: a run trained with train.trainable=[mlp] resumes with the same split."""
    marked = _marked(mask_by_regex(PARAMS, ["mlp"]))
    assert "layers_0/mlp_norm/scale" in marked and "layers_0/mlp/up_proj/kernel" in marked
    assert _marked(mask_by_regex(PARAMS, ["^lm_head/"])) == ["lm_head/kernel"]
    with pytest.raises(ValueError, match="match no parameter"):
        mask_by_regex(PARAMS, ["nothing"])


def test_quantized_kernels_never_train_and_split_join_invert():
    params = quantize(Model(preset("tiny-llama").replace(num_layers=1)).init(jax.random.key(0)), QuantConfig())
    mask = mask_by_regex(params, None)
    trainable, frozen = split(params, mask)
    assert not any("proj" in p for p in _marked(mask))  # every targeted kernel is quantized, hence frozen
    assert count(trainable) + count(frozen) == count(params)
    for a, b in zip(jax.tree.leaves(join(trainable, frozen)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
