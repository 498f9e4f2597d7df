"""jaxtune logits == transformers logits (fp32, <= 1e-4) for every family, on padded batches."""

import numpy as np
import pytest

from jaxtune.interop import load_hf
from jaxtune.models import Model
from tests.hf_reference import CONFIGS
from tests.reference import require

torch = require('torch')

FAMILIES = list(CONFIGS)


def padded_batch(vocab, seed=0):
    """Rows: full length, left padded, right padded, short. Returns tokens and a 0/1 mask."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(4, 12)).astype(np.int64)
    mask = np.ones_like(tokens)
    mask[1, :4] = 0   # left padding
    mask[2, 9:] = 0   # right padding
    mask[3, :7] = 0   # mostly padding
    tokens[mask == 0] = 0
    return tokens, mask


def hf_logits(model, tokens, mask):
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.numpy()


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("impl", ["dpa", "xla"])
def test_logits_match_transformers(hf_checkpoint, name, impl):
    directory, torch_model = hf_checkpoint(name)
    params, cfg = load_hf(directory, attention_impl=impl)
    tokens, mask = padded_batch(cfg.vocab_size)
    ours = np.asarray(Model(cfg).apply(params, tokens.astype(np.int32), segment_ids=mask.astype(np.int32)))
    ref = hf_logits(torch_model, tokens, mask)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4
    assert np.abs(ref[real]).max() > 1.0  # the comparison is not between near-zero logits
