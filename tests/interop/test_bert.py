"""BERT: jaxtune == transformers for BertForPreTraining / BertForMaskedLM / BertForSequenceClassification
(MLM, NSP and classification logits, fp32 <= 1e-4, with padding and token types), the pre-training
loss, export back to each architecture, and LoRA on BERT exported as a PEFT adapter that `peft` loads."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.interop import load_hf, save_hf
from jaxtune.interop.peft_export import save_peft_adapter
from jaxtune.models import Model
from jaxtune.models.heads import NSP, SCORE, classification_logits, nsp_logits
from jaxtune.peft import LoraConfig, LoraWeight, apply_lora
from jaxtune.train.bert import pretraining_loss
from tests.reference import require

torch = require("torch")
transformers = require("transformers")

CONFIG = dict(vocab_size=91, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=40, type_vocab_size=2)


def make_bert(cls_name: str, seed: int = 0, **extra):
    """A random HF BERT with every weight moved away from its init (eval mode, fp32, eager attention)."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(**CONFIG, **extra)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    return model


def pair_batch(vocab: int, seed: int = 0):
    """[CLS] A [SEP] B [SEP] rows of different lengths, right-padded: tokens, token types, mask."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, vocab, size=(3, 14))
    types = np.zeros_like(tokens)
    mask = np.ones_like(tokens)
    for row, (a, b) in enumerate([(5, 6), (3, 4), (2, 2)]):
        tokens[row, 0] = 2
        tokens[row, 1 + a] = tokens[row, 2 + a + b] = 3
        types[row, 2 + a: 3 + a + b] = 1
        mask[row, 3 + a + b:] = 0
    tokens[mask == 0] = 0
    return tokens, types, mask


def batch_of(tokens, types, mask):
    return {"tokens": jnp.asarray(tokens, jnp.int32), "token_types": jnp.asarray(types, jnp.int32),
            "segment_ids": jnp.asarray(mask, jnp.int32)}


def run_hf(model, tokens, types, mask, **labels):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), token_type_ids=torch.tensor(types),
                     attention_mask=torch.tensor(mask), **{k: torch.tensor(v) for k, v in labels.items()})


@pytest.fixture(scope="module")
def pretraining(tmp_path_factory):
    model = make_bert("BertForPreTraining")
    directory = tmp_path_factory.mktemp("bert_pt")
    model.save_pretrained(directory)
    params, cfg = load_hf(directory, attention_impl="xla")
    return model, params, cfg, directory


def test_pretraining_heads_match_transformers(pretraining):
    model, params, cfg, _ = pretraining
    assert cfg.family == "bert" and not cfg.causal and NSP in params
    tokens, types, mask = pair_batch(cfg.vocab_size)
    ref = run_hf(model, tokens, types, mask)
    m = Model(cfg)
    hidden, _ = m.hidden(params, jnp.asarray(tokens, jnp.int32), segment_ids=jnp.asarray(mask, jnp.int32),
                         token_types=jnp.asarray(types, jnp.int32))
    mlm = np.asarray(m.logits(params, hidden))
    real = mask.astype(bool)
    assert np.abs(mlm[real] - ref.prediction_logits.numpy()[real]).max() <= 1e-4
    assert np.abs(ref.prediction_logits.numpy()[real]).max() > 1.0
    nsp = np.asarray(nsp_logits(m, params, hidden))
    np.testing.assert_allclose(nsp, ref.seq_relationship_logits.numpy(), atol=1e-4, rtol=0)
    # token types matter: all-zero types change the logits
    flat, _ = m.hidden(params, jnp.asarray(tokens, jnp.int32), segment_ids=jnp.asarray(mask, jnp.int32))
    assert np.abs(np.asarray(m.logits(params, flat))[real] - mlm[real]).max() > 1e-2


def test_pretraining_loss_matches_transformers(pretraining):
    model, params, cfg, _ = pretraining
    tokens, types, mask = pair_batch(cfg.vocab_size, seed=1)
    rng = np.random.default_rng(3)
    selected = (rng.random(tokens.shape) < 0.3) & (mask == 1) & (tokens > 4)
    inputs = np.where(selected, 4, tokens)  # the masked inputs; targets are the original tokens
    nsp_labels = np.array([0, 1, 1])
    ref = run_hf(model, inputs, types, mask, labels=np.where(selected, tokens, -100), next_sentence_label=nsp_labels)
    batch = {**batch_of(inputs, types, mask), "nsp_labels": jnp.asarray(nsp_labels, jnp.int32),
             "row_mask": jnp.ones(3, jnp.float32)}
    hf_nsp = torch.nn.functional.cross_entropy(ref.seq_relationship_logits, torch.tensor(nsp_labels))
    assert 2 < selected.sum(1).max() <= 8
    # the LM head on every position; on each row's gathered targets (cap 8); a cap some row exceeds
    # (the full computation is taken instead): the same loss and gradient
    grads = []
    for cap in (None, 8, 2):
        def loss(p):
            total, weight, metrics = pretraining_loss(Model(cfg), p, batch, jnp.asarray(tokens, jnp.int32),
                                                      jnp.asarray(selected, jnp.float32), cap=cap)
            return total / weight, (weight, metrics)

        (value, (weight, metrics)), grad = jax.value_and_grad(loss, has_aux=True)(params)
        assert float(value) == pytest.approx(float(ref.loss), abs=1e-5)
        assert float(metrics["nsp_loss"] / weight) == pytest.approx(float(hf_nsp), abs=1e-5)
        grads.append(grad)
    for other in grads[1:]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads[0], other)


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "BertForSequenceClassification"])
def test_other_architectures_match_transformers(tmp_path, cls_name):
    model = make_bert(cls_name, seed=1, num_labels=3)
    model.save_pretrained(tmp_path / "hf")
    params, cfg = load_hf(tmp_path / "hf", attention_impl="xla")
    tokens, types, mask = pair_batch(cfg.vocab_size, seed=2)
    ref = run_hf(model, tokens, types, mask).logits.numpy()
    m = Model(cfg)
    if cls_name == "BertForMaskedLM":
        assert "pooler" in params  # BertForMaskedLM has none: newly initialised, as transformers does
        ours = np.asarray(m.apply(params, jnp.asarray(tokens, jnp.int32), segment_ids=jnp.asarray(mask, jnp.int32),
                                  token_types=jnp.asarray(types, jnp.int32)))
        real = mask.astype(bool)
        assert np.abs(ours[real] - ref[real]).max() <= 1e-4
    else:
        assert params[SCORE]["kernel"].shape == (CONFIG["hidden_size"], 3)
        ours = np.asarray(classification_logits(m, params, batch_of(tokens, types, mask), pooling="cls"))
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # export back: the same architecture, the same tensors
    save_hf(params, cfg, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [cls_name]
    back = getattr(transformers, cls_name).from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    again = run_hf(back, tokens, types, mask).logits.numpy()
    np.testing.assert_allclose(again, ref, atol=1e-5, rtol=0)


def test_export_as_each_architecture(pretraining, tmp_path):
    """A pre-training tree exports as BertForPreTraining (default), or as BertForMaskedLM (no pooler,
    no NSP head), and transformers reads each without missing or unexpected weights."""
    model, params, cfg, _ = pretraining
    tokens, types, mask = pair_batch(cfg.vocab_size)
    ref = run_hf(model, tokens, types, mask)
    for arch in ("BertForPreTraining", "BertForMaskedLM"):
        out = tmp_path / arch
        save_hf(params, cfg, out, architecture=arch if arch == "BertForMaskedLM" else None)
        back, info = getattr(transformers, arch).from_pretrained(out, output_loading_info=True,
                                                                 attn_implementation="eager")
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        got = run_hf(back.eval(), tokens, types, mask)
        logits = got.prediction_logits if arch == "BertForPreTraining" else got.logits
        np.testing.assert_allclose(logits.numpy(), ref.prediction_logits.numpy(), atol=1e-5, rtol=0)


def test_lora_on_bert_loads_in_peft(pretraining, tmp_path):
    """LoRA on BERT's query / value through the one linear op, exported as a PEFT adapter: peft
    puts it on the transformers model with the same MLM logits."""
    peft = require("peft")
    _, params, cfg, directory = pretraining
    adapted = apply_lora(params, LoraConfig(rank=4, alpha=8, targets=("attention-qv",)), jax.random.key(1))
    keys = iter(jax.random.split(jax.random.key(7), 64))
    adapted = jax.tree.map(  # B moved off zero so the adapter changes the output
        lambda x: LoraWeight(x.base, x.a, 0.3 * jax.random.normal(next(keys), x.b.shape), x.scale, x.dropout)
        if isinstance(x, LoraWeight) else x, adapted, is_leaf=lambda x: isinstance(x, LoraWeight))
    tokens, types, mask = pair_batch(cfg.vocab_size, seed=4)
    args = dict(segment_ids=jnp.asarray(mask, jnp.int32), token_types=jnp.asarray(types, jnp.int32))
    m = Model(cfg)
    ours = np.asarray(m.apply(adapted, jnp.asarray(tokens, jnp.int32), **args))
    base = np.asarray(m.apply(params, jnp.asarray(tokens, jnp.int32), **args))
    real = mask.astype(bool)
    assert np.abs(ours[real] - base[real]).max() > 1e-2
    out = save_peft_adapter(adapted, cfg, tmp_path / "adapter", base_model_name_or_path=str(directory))
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["query", "value"]
    hf = transformers.BertForPreTraining.from_pretrained(directory, attn_implementation="eager").eval()
    with_adapter = peft.PeftModel.from_pretrained(hf, out).eval()
    ref = run_hf(with_adapter, tokens, types, mask).prediction_logits.numpy()
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4


def test_quantized_bert_goes_through_the_one_linear_op(pretraining):
    """QLoRA's base on BERT: every attention / MLP projection held as NF4 (double quantized), the
    logits equal those of the dequantized weights (the quantized leaves are what the model reads)."""
    from jaxtune.quant.weight import QuantConfig, dequantize, quantize

    _, params, cfg, _ = pretraining
    quantized = quantize(params, QuantConfig(kind="nf4"))
    assert type(quantized["layers_0"]["attn"]["q_proj"]["kernel"]).__name__ == "QuantizedWeight"
    assert type(quantized["layers_1"]["mlp"]["down_proj"]["kernel"]).__name__ == "QuantizedWeight"
    tokens, types, mask = pair_batch(cfg.vocab_size)
    args = dict(segment_ids=jnp.asarray(mask, jnp.int32), token_types=jnp.asarray(types, jnp.int32))
    m = Model(cfg)
    got = np.asarray(m.apply(quantized, jnp.asarray(tokens, jnp.int32), **args))
    want = np.asarray(m.apply(dequantize(quantized), jnp.asarray(tokens, jnp.int32), **args))
    full = np.asarray(m.apply(params, jnp.asarray(tokens, jnp.int32), **args))
    real = mask.astype(bool)
    assert np.abs(got[real] - want[real]).max() <= 1e-4
    assert np.abs(got[real] - full[real]).max() > 1e-3  # 4-bit weights: not the fp32 model
