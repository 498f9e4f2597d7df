"""Value/reward and classification heads over hidden states (closed forms)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.models import ModelConfig, classifier_head, init_classifier_head, init_scalar_head, scalar_head, sequence_scores
from jaxtune.models.heads import last_token_index, pool

CFG = ModelConfig(hidden_size=8)
HIDDEN = jax.random.normal(jax.random.key(0), (3, 5, 8))
SEG = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


def test_last_token_index_handles_left_and_right_padding():
    np.testing.assert_array_equal(last_token_index(SEG), [2, 4, 4])


def test_scalar_head_is_affine_per_token():
    head = init_scalar_head(jax.random.key(1), CFG)
    head["bias"] = jnp.array([0.5])
    values = scalar_head(head, HIDDEN)
    expected = np.einsum("btd,d->bt", np.asarray(HIDDEN), np.asarray(head["kernel"][:, 0])) + 0.5
    np.testing.assert_allclose(np.asarray(values), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sequence_scores(head, HIDDEN, SEG)), expected[[0, 1, 2], [2, 4, 4]], atol=1e-5)


def test_classifier_pooling():
    head = init_classifier_head(jax.random.key(2), CFG, num_labels=3)
    mean = np.asarray(pool(HIDDEN, SEG, "mean"))
    np.testing.assert_allclose(mean[0], np.asarray(HIDDEN)[0, :3].mean(0), atol=1e-6)
    np.testing.assert_allclose(mean[1], np.asarray(HIDDEN)[1, 2:].mean(0), atol=1e-6)
    logits = classifier_head(head, HIDDEN, SEG, "last")
    expected = np.asarray(HIDDEN)[[0, 1, 2], [2, 4, 4]] @ np.asarray(head["kernel"])
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5)
    assert logits.shape == (3, 3)
