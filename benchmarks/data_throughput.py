"""Data pipeline throughput, and whether prefetch hides it behind the training step.

    python benchmarks/data_throughput.py [--tokenizer DIR] [--batch 8] [--seq 1024] [--batches 40]

Part 1, the pipeline alone: tokens/s of `DocumentStream` over tiny Shakespeare's paragraphs
(7,222 documents, shipped in the package), written as JSONL, packed and padded, with the
byte tokenizer and a byte-level BPE tokenizer (``--tokenizer``; trained here when not given),
and the share of row slots that carry a target (packing efficiency).

Part 2, side by side in one process: the same small Llama training run
(`configs/pretrain_llama_small.yaml` CPU-sized) with ``data.prefetch=0`` and ``=2``; the
step time difference is the time the step waited for data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import statistics
import tempfile
import time

import numpy as np

from jaxtune.cli.tokenizer import train_tokenizer
from jaxtune.config import load_config
from jaxtune.data.pipeline import DocumentOptions, DocumentStream
from jaxtune.data.sources import SourceConfig, build_source
from jaxtune.data.tokenizer import ByteTokenizer, load_tokenizer
from jaxtune.job import TrainJobConfig, run_training

ROOT = Path(__file__).resolve().parents[1]


def pipeline_rate(path: Path, tokenizer, batch: int, seq: int, batches: int, packing: str) -> tuple[float, float]:
    source = build_source(SourceConfig(path=str(path)))
    stream = DocumentStream([source], [1.0], tokenizer, batch_size=batch, seq_len=seq, packing=packing,
                            options=DocumentOptions(add_eos=tokenizer.eos_token_id is not None))
    next(stream)  # open files, first tokenizer call
    start = time.perf_counter()
    filled = 0.0
    for _ in range(batches):
        filled += float(next(stream)["loss_mask"].sum())
    elapsed = time.perf_counter() - start
    return filled / elapsed, filled / (batches * batch * seq)


def training_rate(tokenizer_dir: str, prefetch: int, steps: int) -> float:
    cpu = ["model.config.num_layers=2", "model.config.hidden_size=128", "model.config.num_heads=4",
           "model.config.num_kv_heads=2", "model.config.head_dim=32", "model.config.intermediate_size=352",
           "model.dtype=float32", "model.attention_impl=dpa", "train.remat=none", "train.batch_size=8",
           "train.seq_len=128", f"train.steps={steps}", "train.eval_every=0", "train.eval_batches=0",
           "optim.warmup_steps=2", f"tokenizer.path={tokenizer_dir}", f"data.prefetch={prefetch}",
           "checkpoint.directory=null", "logging.progress=false", "logging.jsonl=false", "logging.tensorboard=false"]
    job = load_config(TrainJobConfig, ROOT / "configs/pretrain_llama_small.yaml", cpu)
    times = []
    last = [None]

    def clock(step, metrics):
        now = time.perf_counter()
        if last[0] is not None and step > 3:
            times.append(now - last[0])
        last[0] = now

    run_training(job, callbacks=[clock])
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="HF tokenizer directory (default: train an 8k BPE here)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paragraphs = build_source(SourceConfig(path="builtin:tinyshakespeare.txt", text_split="paragraph"))
        corpus = tmp / "shakespeare.jsonl"
        corpus.write_text("".join(json.dumps({"text": paragraphs.read(i)}) + "\n" for i in range(len(paragraphs))))
        tok_dir = args.tokenizer or str(tmp / "bpe")
        if not args.tokenizer:
            train_tokenizer(["builtin:tinyshakespeare.txt"], 8192, tok_dir)
        tokenizers = {"byte": ByteTokenizer(), "bpe-8k": load_tokenizer(tok_dir, "hf")}
        print(f"pipeline alone: {len(paragraphs)} documents, batch {args.batch} x {args.seq}")
        print("| tokenizer | packing | target tokens/s | slots with a target |")
        print("|---|---|---|---|")
        for name, tokenizer in tokenizers.items():
            for packing in ("pack", "pad"):
                rate, fill = pipeline_rate(corpus, tokenizer, args.batch, args.seq, args.batches, packing)
                print(f"| {name} | {packing} | {rate:,.0f} | {fill:.1%} |")
        print(f"\ntraining step (CPU-sized Llama recipe, batch 8 x 128), median of {args.steps - 4} steps:")
        for prefetch in (0, 2):
            seconds = training_rate(tok_dir, prefetch, args.steps)
            print(f"data.prefetch={prefetch}: {seconds * 1000:.1f} ms/step")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
