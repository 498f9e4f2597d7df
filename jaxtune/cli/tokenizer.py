"""`jaxtune tokenizer train FILE... --vocab-size N --out DIR`: a byte-level BPE tokenizer, or with
``--kind wordpiece`` a BERT-style WordPiece one ([PAD] [UNK] [CLS] [SEP] [MASK], uncased unless
``--cased``), trained on local text with Hugging Face `tokenizers` and saved as a transformers fast
tokenizer (``tokenizer.json`` + config) that `tokenizer.path` / `tokenizer.kind=hf` load. For runs
that have no tokenizer files of their own; to fine-tune a released model use its tokenizer."""

from __future__ import annotations

from pathlib import Path

from jaxtune.data.sources import SourceConfig, build_source

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# BERT's special tokens, in bert-base's order of ids ([PAD] = 0, the id BertConfig pads with)
WORDPIECE_SPECIAL = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                     "mask_token": "[MASK]"}


def add_parser(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE or WordPiece tokenizer on local text")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train and save a tokenizer (transformers format)")
    t.add_argument("inputs", nargs="+", help="text / JSONL / JSON / Parquet files or globs (builtin:NAME for shipped data)")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--out", required=True, help="directory to write (must not hold a tokenizer already)")
    t.add_argument("--field", default="text", help="JSON / Parquet field holding the text")
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--kind", choices=("bpe", "wordpiece"), default="bpe",
                   help="bpe: byte-level BPE (GPT-2 / Llama style); wordpiece: BERT's, with [CLS] [SEP] [MASK]")
    t.add_argument("--cased", action="store_true", help="wordpiece: keep case (default: lowercased, as bert-base-uncased)")
    t.set_defaults(func=run)


def documents(inputs: list[str], field: str):
    for item in inputs:
        source = build_source(SourceConfig(path=item, field=field, text_split="paragraph"))
        for i in range(len(source)):
            yield source.read(i)


def train_tokenizer(inputs: list[str], vocab_size: int, out: str | Path, *, field: str = "text", min_frequency: int = 2):
    """Train byte-level BPE on the documents of ``inputs``; returns the transformers tokenizer saved in ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    if (out / "tokenizer.json").exists():
        raise FileExistsError(f"{out} already holds a tokenizer; choose another --out")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
    bpe = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(documents(inputs, field), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL_TOKENS)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return tokenizer


def train_wordpiece(inputs: list[str], vocab_size: int, out: str | Path, *, field: str = "text",
                    min_frequency: int = 2, lowercase: bool = True):
    """Train BERT's WordPiece (its normalizer, pre-tokenizer and ``[CLS] A [SEP] B [SEP]`` post-processor)
    on the documents of ``inputs``; returns the `BertTokenizerFast` saved in ``out``. Not reproducible
    from one process to the next: `tokenizers`' WordPiece trainer numbers continuation pieces (``##a``)
    in hash-map order, and merges of equal frequency are chosen by those numbers, so a few pieces and
    many ids differ between runs. Train once and reuse the directory (the BERT recipe ships one)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    out = Path(out)
    if (out / "tokenizer.json").exists():
        raise FileExistsError(f"{out} already holds a tokenizer; choose another --out")
    specials = list(WORDPIECE_SPECIAL.values())
    if vocab_size < len(specials) + 64:
        raise ValueError(f"--vocab-size must be at least {len(specials) + 64} for a WordPiece vocabulary")
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials)
    wordpiece.train_from_iterator(documents(inputs, field), trainer=trainer)
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece, do_lower_case=lowercase, **WORDPIECE_SPECIAL)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return tokenizer


def run(args) -> int:
    common = dict(field=args.field, min_frequency=args.min_frequency)
    if args.kind == "wordpiece":
        tokenizer = train_wordpiece(args.inputs, args.vocab_size, args.out, lowercase=not args.cased, **common)
        what = f"WordPiece ({'cased' if args.cased else 'uncased'}; [CLS] A [SEP] B [SEP])"
    else:
        tokenizer = train_tokenizer(args.inputs, args.vocab_size, args.out, **common)
        what = "byte-level BPE"
    print(f"saved a {len(tokenizer)}-token {what} tokenizer to {args.out}")
    return 0
