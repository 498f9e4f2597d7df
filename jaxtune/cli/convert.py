"""`jaxtune convert hf-to-orbax SRC DST` and `jaxtune convert orbax-to-hf SRC DST`."""

from __future__ import annotations

from jaxtune.checkpoint import restore_params, save_params
from jaxtune.data.tokenizer import has_hf_tokenizer, load_tokenizer
from jaxtune.interop import load_hf, save_hf


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints between Hugging Face and Orbax")
    p.add_argument("direction", choices=["hf-to-orbax", "orbax-to-hf"])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the written weights (default: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.direction == "hf-to-orbax":
        from jaxtune.interop.hf_weights import read_config

        stored = read_config(args.src).get("torch_dtype") or read_config(args.src).get("dtype") or "float32"
        dtype = args.dtype or (stored if stored in ("float32", "bfloat16", "float16") else "float32")
        params, cfg = load_hf(args.src, param_dtype=dtype)
        save_params(args.dst, params, cfg, overwrite=args.overwrite)
    else:
        params, cfg = restore_params(args.src)
        save_hf(params, cfg, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    if has_hf_tokenizer(args.src):
        load_tokenizer(args.src, "hf").save(args.dst)
    print(f"wrote {args.dst} ({cfg.family}, {cfg.num_layers} layers, vocab {cfg.vocab_size})")
    return 0
