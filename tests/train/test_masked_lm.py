"""Masked-LM objective: token masking statistics, the loss in closed form, bidirectional attention."""

import functools
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtune.cli.main import main
from jaxtune.data.masking import mask_tokens
from jaxtune.interop.hf_config import UnsupportedModelError, check_expressible, to_hf_config
from jaxtune.job import ObjectiveConfig, TrainJobConfig, load_model
from jaxtune.job.objectives import Context, get_objective
from jaxtune.job.schema import ModelSource
from jaxtune.models import Model, ModelConfig
from jaxtune.models.attention import attention_mask
from jaxtune.train.config import TrainConfig
from jaxtune.train.losses import causal_lm_loss, masked_lm_loss
from jaxtune.train.step import TrainState, make_train_step

V = 32
CFG = ModelConfig(
    family="llama", vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    intermediate_size=64, max_position_embeddings=64, causal=False,
)
MASK_ID = V - 1


@functools.lru_cache(maxsize=None)
def _params(cfg, seed):
    return jax.jit(Model(cfg).init)(jax.random.key(seed))  # shared read-only by the tests (nothing donates it)


def _setup(cfg=CFG, seed=0):
    return Model(cfg), _params(cfg, seed)


@functools.lru_cache(maxsize=None)
def _jit_mask(**kw):
    return jax.jit(functools.partial(mask_tokens, **kw))


def _mask(tokens, segment_ids, rng, *, special_ids=(), **kw):
    """`mask_tokens` under jit (compiled once per setting; eager would compile op by op)."""
    return _jit_mask(special_ids=tuple(special_ids), **kw)(tokens, segment_ids, rng)


@functools.lru_cache(maxsize=None)
def _apply(cfg):
    """Jitted logits for one config (compiled once per config and shape across the tests)."""
    model = Model(cfg)
    return jax.jit(lambda params, tokens, segment_ids: model.apply(params, tokens, segment_ids=segment_ids))


def _within(observed, total, p, sigmas=5.0):
    """|observed / total - p| within ``sigmas`` binomial standard deviations."""
    sd = np.sqrt(p * (1 - p) / total)
    assert abs(observed / total - p) < sigmas * sd, (observed, total, p, sd)


# ---------------------------------------------------------------- masking


def _mask_batch(rows=64, seq=512, vocab=100, specials=(1, 2), seed=0):
    """Tokens in [0, vocab - 1) (never the mask id vocab - 1), specials sprinkled in, two packed
    segments per row and a random amount of padding at the end."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab - 1, (rows, seq))
    tokens[rng.random((rows, seq)) < 0.05] = rng.choice(specials)
    split = rng.integers(seq // 4, seq // 2, (rows, 1))
    end = rng.integers(seq // 2, seq + 1, (rows, 1))
    index = np.arange(seq)[None, :]
    segments = np.where(index < split, 1, np.where(index < end, 2, 0))
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(segments, jnp.int32)


def test_mask_statistics_match_bert_recipe():
    vocab, specials = 100, (1, 2)
    tokens, segments = _mask_batch(vocab=vocab, specials=specials)
    inputs, targets, loss_mask = _mask(
        tokens, segments, jax.random.key(7), mask_token_id=vocab - 1, vocab_size=vocab, special_ids=specials
    )
    tokens, segments, inputs, targets = map(np.asarray, (tokens, segments, inputs, targets))
    assert loss_mask.dtype == jnp.float32
    sel = np.asarray(loss_mask) == 1.0
    assert set(np.unique(np.asarray(loss_mask))) <= {0.0, 1.0}
    np.testing.assert_array_equal(targets, tokens)

    real = (segments != 0) & ~np.isin(tokens, specials)
    assert (segments == 0).sum() > 1000 and np.isin(tokens, specials).sum() > 1000
    assert not (sel & ~real).any(), "padding or a special token was selected"
    np.testing.assert_array_equal(inputs[~sel], tokens[~sel])  # unselected tokens are untouched

    n_real, n_sel = real.sum(), sel.sum()
    _within(n_sel, n_real, 0.15)
    # Independent Bernoulli draws: per-row counts vary like binomials (not a fixed count per row).
    per_row = (sel.sum(1) - 0.15 * real.sum(1)) / np.sqrt(real.sum(1) * 0.15 * 0.85)
    assert 0.5 < per_row.var() < 2.0

    # Among the selected: mask token 80%, random 10%, kept 10%. A random replacement is the mask id
    # or the original token with probability 1/V each (originals are never the mask id here).
    x, t = inputs[sel], tokens[sel]
    is_mask = x == vocab - 1
    is_same = x == t
    is_other = ~is_mask & ~is_same
    _within(is_mask.sum(), n_sel, 0.8 + 0.1 / vocab)
    _within(is_same.sum(), n_sel, 0.1 + 0.1 / vocab)
    _within(is_other.sum(), n_sel, 0.1 * (1 - 2 / vocab))
    assert ((x >= 0) & (x < vocab)).all()


def test_random_replacements_are_uniform_over_the_vocab():
    vocab = 64
    tokens = jnp.full((64, 512), 5, jnp.int32)
    segments = jnp.ones_like(tokens)
    inputs, _, loss_mask = _mask(
        tokens, segments, jax.random.key(3), mask_token_id=0, vocab_size=vocab, rate=0.5, random_rate=1.0, keep_rate=0.0
    )
    values = np.asarray(inputs)[np.asarray(loss_mask) == 1.0]
    _within(values.size, tokens.size, 0.5)
    counts = np.bincount(values, minlength=vocab)
    assert counts.size == vocab  # nothing at or above vocab_size
    expected = values.size / vocab
    chi2 = ((counts - expected) ** 2 / expected).sum()
    dof = vocab - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof), chi2  # ~1e-6 tail; a missing id alone adds ~256
    assert counts.min() > 0


def test_masks_follow_the_rng_and_jit():
    tokens, segments = _mask_batch(rows=4, seq=256)
    kw = dict(mask_token_id=99, vocab_size=100)
    a = _mask(tokens, segments, jax.random.key(1), **kw)
    b = _mask(tokens, segments, jax.random.key(1), **kw)
    c = _mask(tokens, segments, jax.random.key(2), **kw)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert (np.asarray(a[2]) != np.asarray(c[2])).any()
    assert (np.asarray(a[0]) != np.asarray(c[0])).any()
    # raw uint32 key data works too (TrainState stores its rng that way)
    raw = _mask(tokens, segments, jax.random.key_data(jax.random.key(1)), **kw)
    np.testing.assert_array_equal(raw[2], a[2])


@pytest.mark.parametrize("bad", [
    dict(rate=0.0), dict(rate=1.0), dict(rate=1.5), dict(random_rate=0.6, keep_rate=0.5),
    dict(random_rate=-0.1), dict(mask_token_id=100), dict(mask_token_id=-1),
])
def test_mask_tokens_validates(bad):
    tokens = jnp.zeros((1, 4), jnp.int32)
    kw = {"mask_token_id": 99, "vocab_size": 100, **bad}
    with pytest.raises(ValueError):
        mask_tokens(tokens, tokens + 1, jax.random.key(0), **kw)


# ---------------------------------------------------------------- the loss


def _lm_batch(rows=8, seq=32, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, V - 1, (rows, seq))
    index = np.arange(seq)[None, :]
    split, end = rng.integers(8, 16, (rows, 1)), rng.integers(20, seq + 1, (rows, 1))
    segments = np.where(index < split, 1, np.where(index < end, 2, 0))
    return {
        "tokens": jnp.asarray(tokens, jnp.int32),
        "segment_ids": jnp.asarray(segments, jnp.int32),
        # the masked loss must ignore the causal layout's targets and loss_mask
        "targets": jnp.zeros((rows, seq), jnp.int32),
        "loss_mask": jnp.zeros((rows, seq), jnp.float32),
    }


@pytest.mark.parametrize("chunk_tokens,z_loss", [(0, 0.0), (48, 1e-3)])
def test_masked_loss_matches_closed_form(chunk_tokens, z_loss):
    model, params = _setup()
    batch = _lm_batch()
    key = jax.random.key(11)
    loss_fn = jax.jit(masked_lm_loss(model, mask_token_id=MASK_ID, special_ids=(2,), z_loss=z_loss,
                                     chunk_tokens=chunk_tokens))
    total, weight, metrics = loss_fn(params, batch, key)

    inputs, targets, sel = _mask(batch["tokens"], batch["segment_ids"], key, mask_token_id=MASK_ID,
                                 vocab_size=V, special_ids=(2,))
    logits = np.asarray(_apply(CFG)(params, inputs, batch["segment_ids"]), np.float64)
    top = logits.max(-1, keepdims=True)
    lse = (np.log(np.exp(logits - top).sum(-1, keepdims=True)) + top)[..., 0]
    logp = logits - lse[..., None]
    sel = np.asarray(sel, np.float64)
    targets = np.asarray(targets)
    nll = -(np.take_along_axis(logp, targets[..., None], -1)[..., 0] * sel).sum()
    correct = ((logits.argmax(-1) == targets) * sel).sum()
    z = (lse**2 * sel).sum()

    assert 10 < sel.sum() < 0.5 * (np.asarray(batch["segment_ids"]) != 0).sum()
    assert float(weight) == sel.sum()
    assert correct > 0  # so the accuracy comparison below means something
    np.testing.assert_allclose(float(metrics["nll"]), nll, rtol=1e-5)
    np.testing.assert_allclose(float(total), nll + z_loss * z, rtol=1e-5)
    assert float(metrics["masked_accuracy"]) == correct
    assert ("z_loss" in metrics) == bool(z_loss)
    # different rng, different masks
    assert float(loss_fn(params, batch, jax.random.key(12))[1]) != float(weight)


def test_masked_loss_refuses_causal_models_and_bad_ids():
    with pytest.raises(ValueError, match="causal=False"):
        masked_lm_loss(Model(CFG.replace(causal=True)), mask_token_id=MASK_ID)
    with pytest.raises(ValueError, match="vocab_size"):
        masked_lm_loss(Model(CFG), mask_token_id=V)


def objective_loss(model, objective, *, tokenizer_mask_id=None, z_loss=0.0):
    """The registered objective's loss for a job with ``objective`` (a tokenizer with that mask id)."""
    tokenizer = SimpleNamespace(mask_token_id=tokenizer_mask_id, bos_token_id=None, eos_token_id=None,
                                pad_token_id=None)
    job = TrainJobConfig(objective=objective, train=TrainConfig(z_loss=z_loss))
    return get_objective(objective.kind).loss(Context(job, model.cfg, tokenizer))


def test_objective_config_and_objective_loss():
    model, params = _setup()
    batch = _lm_batch()
    key = jax.random.key(5)
    for bad in (dict(kind="span"), dict(mask_rate=0.0), dict(random_rate=0.7, keep_rate=0.4), dict(mask_token_id=-3)):
        with pytest.raises(ValueError, match="ObjectiveConfig"):
            ObjectiveConfig(**bad)

    masked = ObjectiveConfig(kind="masked", mask_rate=0.3)
    with pytest.raises(ValueError, match="objective.mask_token_id"):
        objective_loss(model, masked)
    with pytest.raises(ValueError, match="vocab_size"):
        objective_loss(model, masked, tokenizer_mask_id=V + 3)
    with pytest.raises(ValueError, match="vocab_size"):
        objective_loss(model, ObjectiveConfig(kind="masked", mask_token_id=V))
    with pytest.raises(ValueError, match="causal"):
        objective_loss(model, ObjectiveConfig())  # next-token loss on a bidirectional model

    causal_model = Model(CFG.replace(causal=True))
    losses = {
        "expected": masked_lm_loss(model, mask_token_id=MASK_ID, rate=0.3),
        "from_tokenizer": objective_loss(model, masked, tokenizer_mask_id=MASK_ID),
        # the objective's own mask id wins over the tokenizer's
        "own": objective_loss(model, ObjectiveConfig(kind="masked", mask_rate=0.3, mask_token_id=MASK_ID),
                              tokenizer_mask_id=3),
        "causal": objective_loss(causal_model, ObjectiveConfig(), z_loss=1e-3),
        "causal_expected": causal_lm_loss(causal_model, z_loss=1e-3),
    }
    causal_batch = {**batch, "targets": batch["tokens"], "loss_mask": (batch["segment_ids"] != 0).astype(jnp.float32)}
    out = jax.jit(lambda p, b, cb, k: {name: f(p, cb if name.startswith("causal") else b, k)[:2]
                                       for name, f in losses.items()})(params, batch, causal_batch, key)
    for name in ("from_tokenizer", "own"):
        np.testing.assert_array_equal(out[name], out["expected"])
    np.testing.assert_array_equal(out["causal"], out["causal_expected"])
    assert float(out["causal"][0]) != float(out["expected"][0])


# ---------------------------------------------------------------- bidirectional attention


@pytest.mark.parametrize("impl", ["dpa", "xla"])  # cudnn: the same call as dpa with the same mask
def test_bidirectional_attention_sees_the_right_context(impl):
    _, params = _setup()
    tokens = jnp.arange(3, 15, dtype=jnp.int32)[None, :]  # 12 tokens
    changed = tokens.at[0, 5].set(20)

    def logits(causal, toks, seg=None):
        seg = jnp.ones_like(toks) if seg is None else seg
        return np.asarray(_apply(CFG.replace(causal=causal, attention_impl=impl))(params, toks, seg))

    assert np.abs(logits(False, tokens)[0, 0] - logits(False, changed)[0, 0]).max() > 1e-4
    np.testing.assert_allclose(logits(True, tokens)[0, :5], logits(True, changed)[0, :5], atol=1e-6)

    # packed: segment 2 (slots 6..11) changes, segment 1 does not; padding is invisible
    seg = jnp.asarray([[1] * 6 + [2] * 6])
    in_seg2 = tokens.at[0, 9].set(20)
    a, b = logits(False, tokens, seg), logits(False, in_seg2, seg)
    np.testing.assert_allclose(a[0, :6], b[0, :6], atol=1e-6)
    assert np.abs(a[0, 6] - b[0, 6]).max() > 1e-4  # earlier slot of segment 2 sees slot 9
    pad = jnp.asarray([[1] * 8 + [0] * 4])
    np.testing.assert_allclose(logits(False, tokens, pad)[0, :8], logits(False, tokens.at[0, 10].set(20), pad)[0, :8],
                               atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_mask_rule(causal, window):
    seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3, 3, 3, 3]])
    idx = np.arange(seg.shape[1])
    got = np.asarray(attention_mask(jnp.asarray(seg), jnp.asarray(seg), jnp.asarray(idx), jnp.asarray(idx), window,
                                    causal=causal))
    assert got.shape == (2, 1, 10, 10)
    for b in range(2):
        for i in range(10):
            for j in range(10):
                ok = seg[b, i] == seg[b, j] != 0
                ok &= (j <= i) if causal else True
                if window is not None:
                    ok &= (i - j < window) if causal else (abs(i - j) < window)
                assert got[b, 0, i, j] == ok, (b, i, j)


def test_kv_cache_and_hf_export_refuse_non_causal_models():
    model, params = _setup()
    tokens = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="causal"):
        model.apply(params, tokens, positions=jnp.arange(4)[None], cache=model.init_cache(1, 8))
    for export in (to_hf_config, check_expressible):
        with pytest.raises(UnsupportedModelError, match="causal=False"):
            export(CFG)
    to_hf_config(CFG.replace(causal=True))  # the causal twin exports


# ---------------------------------------------------------------- training


def test_masked_lm_training_steps_learn_with_fresh_masks_per_step_and_micro_batch():
    model, params = _setup()
    # one repeated token per row (never the mask id): a masked slot is predictable from any neighbour
    rows = np.random.default_rng(4).integers(0, V - 1, (8, 1))
    tokens = jnp.asarray(np.repeat(rows, 32, axis=1), jnp.int32)
    # rows 2i and 2i + 1 are equal, so the two micro-batches (even rows, odd rows) are identical
    tokens = jnp.repeat(tokens, 2, axis=0)
    batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens)}
    base = masked_lm_loss(model, mask_token_id=MASK_ID, rate=0.25)

    def loss_fn(p, b, rng):  # also sums weight^2 over micro-batches
        total, weight, metrics = base(p, b, rng)
        return total, weight, {**metrics, "weight_sq": weight**2}

    opt = optax.adam(1e-2)
    step = make_train_step(loss_fn, opt, grad_accum=2)
    state = TrainState.create(params, opt, jax.random.key(0))
    history, distinct_micro = [], 0
    for _ in range(25):
        state, metrics = step(state, None, batch)
        metrics = jax.device_get(metrics)
        history.append(metrics)
        total = float(metrics["tokens"])
        # equal keys per micro-batch would select equal counts c0 == c1: c0^2 + c1^2 == (c0 + c1)^2 / 2
        distinct_micro += float(metrics["weight_sq"]) * total != total**2 / 2
    assert len({float(m["tokens"]) for m in history}) > 10  # a new mask every step
    assert distinct_micro > 15  # and a different one per micro-batch
    # metrics arrive divided by the selected-token count: loss and accuracy per masked token
    first, last = history[0], history[-3:]
    assert np.mean([m["loss"] for m in last]) < 0.5 * first["loss"]
    assert np.mean([m["masked_accuracy"] for m in last]) > 0.5 > first["masked_accuracy"]


def test_masked_lm_switch_trains_and_evaluates_from_the_cli(tmp_path, capsys):
    """objective.kind=masked on the shipped char recipe: a bidirectional model is trained (masked
    accuracy logged), saved non-causal, and `jaxtune eval` reproduces its held-out loss."""
    ckpt = tmp_path / "mlm"
    args = ["configs/pretrain_shakespeare_char.yaml", "objective.kind=masked", "objective.mask_token_id=65",
            "train.steps=3", "train.eval_every=3", "train.eval_batches=2", "optim.warmup_steps=1",
            "logging.progress=false", "logging.tensorboard=false"]
    assert main(["train", *args, "model.config.vocab_size=66", f"checkpoint.directory={ckpt}"]) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "eval/loss" in r]
    assert len(val) == 1 and 0.0 <= val[0]["eval/masked_accuracy"] <= 1.0
    assert not load_model(ModelSource(checkpoint=str(ckpt)))[1].causal
    assert main(["eval", "--json", *args, f"model.checkpoint={ckpt}", "eval.tasks=[{kind: loss, limit: 2}]"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]["loss"] == pytest.approx(val[0]["eval/loss"], rel=1e-6)
    # Without a mask token the error names the key.
    assert main(["train", "configs/pretrain_shakespeare_char.yaml", "objective.kind=masked", "train.steps=1",
                 "optim.schedule=constant", f"checkpoint.directory={tmp_path / 'x'}", "logging.progress=false"]) == 1
    assert "objective.mask_token_id" in capsys.readouterr().err
