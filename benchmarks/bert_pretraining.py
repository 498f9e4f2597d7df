"""BERT pre-training step (MLM + NSP): jaxtune vs transformers' BertForPreTraining, same weights, same
masked batch, same CPU, one run.

    python benchmarks/bert_pretraining.py [--batch 16] [--seq 128] [--repeats 8]

Model: Google's BERT-small shape (4 layers, hidden 512, 8 heads, FFN 2048, vocab 30522, 2 token types;
29 M parameters), created by transformers with random weights and loaded into jaxtune. The batch is
[CLS] A [SEP] B [SEP] rows with token types, 15% of the tokens masked (the same positions and inputs on
both sides) and half the NSP labels "random". One step = forward, the pre-training loss (mean MLM
cross-entropy + mean NSP cross-entropy), backward, global-norm clip 1.0, AdamW; fp32 everywhere.
Reported: median of --repeats steps after two warm-up steps, tokens/s (padded positions included),
the ratio, jaxtune's first step with compilation, and the first-step loss of both sides (they must agree).
jaxtune runs twice: the MLM head on every position (what transformers does), and on each row's
gathered masked positions (what the ``nsp`` / ``masked`` objectives do; `selected_cross_entropy`).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from train_throughput import time_steps, time_torch_steps  # benchmarks/ is on sys.path when run as a script
from jaxtune.interop import load_hf
from jaxtune.models import Model
from jaxtune.models.heads import NSP
from jaxtune.train.bert import pretraining_loss
from jaxtune.train.losses import selection_cap
from jaxtune.train.optim import OptimConfig, build_optimizer
from jaxtune.train.step import TrainState, make_train_step

BERT_SMALL = dict(vocab_size=30522, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                  intermediate_size=2048, max_position_embeddings=512, type_vocab_size=2)


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """Rows of two segments filling the row (lengths vary), 15% of the real non-special tokens masked."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1000, vocab, (batch, seq))
    types, mask = np.zeros_like(tokens), np.zeros_like(tokens)
    for row in range(batch):
        length = int(rng.integers(seq * 3 // 4, seq + 1))
        a = int(rng.integers(1, length - 3))
        tokens[row, 0], tokens[row, a + 1], tokens[row, length - 1] = 101, 102, 102
        types[row, a + 2: length] = 1
        mask[row, :length] = 1
    tokens[mask == 0] = 0
    special = (tokens == 101) | (tokens == 102) | (mask == 0)
    selected = (rng.random(tokens.shape) < 0.15) & ~special
    inputs = np.where(selected, 103, tokens)
    return {"inputs": inputs, "targets": tokens, "selected": selected, "types": types, "mask": mask,
            "nsp": rng.integers(0, 2, batch)}


def jax_side(params, cfg, b, repeats, cap=None):
    opt, schedule = build_optimizer(OptimConfig(lr=1e-4, weight_decay=0.01, clip_norm=1.0, schedule="constant",
                                                decay_embeddings=True, decay_norms=True), 100)
    model = Model(cfg)
    batch = {"tokens": jnp.asarray(b["inputs"], jnp.int32), "segment_ids": jnp.asarray(b["mask"], jnp.int32),
             "token_types": jnp.asarray(b["types"], jnp.int32), "nsp_labels": jnp.asarray(b["nsp"], jnp.int32),
             "row_mask": jnp.ones(len(b["nsp"]), jnp.float32), "targets": jnp.asarray(b["targets"], jnp.int32),
             "selected": jnp.asarray(b["selected"], jnp.float32)}

    def loss_fn(p, batch, rng):  # the masks are fixed in the batch, as on the PyTorch side
        return pretraining_loss(model, p, batch, batch["targets"], batch["selected"], cap=cap)

    step = make_train_step(loss_fn, opt, schedule)
    return time_steps(step, TrainState.create(params, opt, jax.random.key(0)), batch, repeats)


def torch_side(model, b, repeats):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    kwargs = dict(input_ids=torch.tensor(b["inputs"]), token_type_ids=torch.tensor(b["types"]),
                  attention_mask=torch.tensor(b["mask"]), labels=torch.tensor(np.where(b["selected"], b["targets"], -100)),
                  next_sentence_label=torch.tensor(b["nsp"]))

    return time_torch_steps(model, opt, lambda: model(**kwargs).loss, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")  # true fp32 on every backend
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    # dropout off on both sides (jaxtune trains without it): the same function, the same loss
    config = transformers.BertConfig(**BERT_SMALL, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch_model = transformers.BertForPreTraining(config)
    with tempfile.TemporaryDirectory() as directory:
        torch_model.save_pretrained(directory)
        params, cfg = load_hf(directory)
    assert NSP in params
    b = make_batch(args.batch, args.seq, cfg.vocab_size)
    n_tokens = args.batch * args.seq
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print(f"model: BERT-small ({sum(p.numel() for p in torch_model.parameters()) / 1e6:.1f} M params), batch "
          f"{args.batch} x {args.seq}, MLM + NSP, AdamW, fp32, median of {args.repeats} steps")
    torch_s, torch_loss = torch_side(torch_model, b, args.repeats)
    cap = selection_cap(args.seq, 0.15)
    variants = {"all positions": None, f"gathered ({cap}/row)": cap}
    results = {name: jax_side(params, cfg, b, args.repeats, c) for name, c in variants.items()}
    print(f"{'transformers':38s}{n_tokens / torch_s:8.0f} tokens/s  {torch_s * 1e3:7.1f} ms/step  "
          f"first loss {torch_loss:.5f}")
    for name, (jax_s, first_s, jax_loss) in results.items():
        print(f"jaxtune, MLM head {name:20s}{n_tokens / jax_s:8.0f} tokens/s  {jax_s * 1e3:7.1f} ms/step  "
              f"first loss {jax_loss:.5f}  first step incl. compile {first_s:.2f} s  ratio {torch_s / jax_s:.2f}x")


if __name__ == "__main__":
    main()
