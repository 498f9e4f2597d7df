"""`jaxtune convert DIRECTION SRC DST`: checkpoints and adapters between Orbax, Hugging Face and PEFT.

    hf-to-orbax   HF_DIR DST                  transformers checkpoint -> jaxtune params checkpoint
    orbax-to-hf   SRC DST [--merge-lora]      params checkpoint or training run -> transformers checkpoint;
                                              a PEFT run needs --merge-lora (adapters folded into the weights)
    orbax-to-peft RUN DST                     the adapter of a PEFT run -> PEFT adapter directory
                                              (adapter_config.json + adapter_model.safetensors; the base's
                                              path, and jaxtune_adapter.json: the run, its base, the
                                              quantization a QLoRA adapter was trained against)
    peft-to-hf    ADAPTER DST --base SRC      a PEFT adapter merged into its base -> transformers checkpoint
                                              (--base: HF directory or jaxtune checkpoint)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from jaxtune.config import to_dict
from jaxtune.data.tokenizer import has_hf_tokenizer, load_tokenizer
from jaxtune.interop import load_hf, save_hf
from jaxtune.interop.hf_config import BERT_ARCHITECTURES
from jaxtune.interop.adapters import adapter_config, save_adapter
from jaxtune.interop.hf_quant import bnb_load_config
from jaxtune.interop.hf_weights import read_config
from jaxtune.job import ModelSource, load_model, runmeta
from jaxtune.job.assemble import save_model
from jaxtune.peft.core import ADDED_KEYS, adapter_leaves, merge_adapters
from jaxtune.quant.weight import dequantize, quantized_paths

DIRECTIONS = ("hf-to-orbax", "orbax-to-hf", "orbax-to-peft", "peft-to-hf")
ADAPTER_RECORD = "jaxtune_adapter.json"  # beside an exported adapter: the run, its base, the quantization it trained on


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints and adapters between Hugging Face, Orbax and PEFT",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("direction", choices=DIRECTIONS)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the written weights (default: as stored)")
    p.add_argument("--merge-lora", action="store_true",
                   help="orbax-to-hf: fold LoRA / DoRA / IA3 adapters into the weights (no extra latency)")
    p.add_argument("--base", default=None, help="peft-to-hf: the base model (HF directory or jaxtune checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.add_argument("--architecture", choices=BERT_ARCHITECTURES, default=None,
                   help="BERT exports: the Hugging Face architecture (default: from the heads the model holds: "
                        "score -> BertForSequenceClassification, NSP -> BertForPreTraining, else BertForMaskedLM)")
    p.set_defaults(func=run)


def _source(path: str) -> ModelSource:
    is_hf = (Path(path) / "config.json").exists() and not (Path(path) / "model_config.json").exists()
    return ModelSource(hf_dir=path) if is_hf else ModelSource(checkpoint=path)


def _merged(params, merge: bool, src: str):
    """Adapters folded in (with --merge-lora) and quantized kernels dequantized: a Hugging Face
    export holds dense weights (in the dtype the kernels were quantized from, or --dtype)."""
    carries = bool(adapter_leaves(params)) or any(k in params for k in ADDED_KEYS)
    if carries and not merge:
        raise ValueError(f"{src} carries PEFT adapters: pass --merge-lora to fold them into the weights, or export "
                         "the adapter alone with `jaxtune convert orbax-to-peft`")
    quantized = quantized_paths(params)
    params = merge_adapters(params) if carries else params
    if quantized:
        kinds = sorted({c.kind for c in quantized.values()})
        print(f"dequantized {len(quantized)} {'/'.join(kinds)} kernels (merged in 16/32-bit): the export is dense")
        params = dequantize(params)
    return params


def _check_destination(args) -> None:
    """Refuse a non-empty destination without --overwrite before anything is loaded (hf-to-orbax:
    the params checkpoint refuses an existing one itself)."""
    dst = Path(args.dst)
    if args.overwrite or args.direction == "hf-to-orbax" or not dst.exists():
        return
    if not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is a file, not a directory")
    if any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty (pass --overwrite to replace its files)")


def _rslora(run_dir: str) -> bool:
    """Whether the run's LoRA adapters use rsLoRA scaling (its peft.lora section, or the PEFT
    adapter it started from), so the exported adapter says use_rslora with the run's alpha."""
    peft = runmeta.recorded_peft(runmeta.read_train_meta(run_dir), run_dir)
    if peft is None:
        return False
    if peft.lora is not None:
        return bool(peft.lora.rslora)
    if peft.adapter is not None and Path(peft.adapter).is_dir():
        return bool(adapter_config(peft.adapter).get("use_rslora"))
    return False


def _adapter_provenance(run_dir: str) -> tuple[Optional[str], list[str], dict]:
    """-> (``base_model_name_or_path`` for adapter_config.json, notes for the user, the record written
    beside the adapter): the run's base model and, for QLoRA, the quantization its adapter was
    trained against (loaded on a 16/32-bit base it gives other outputs)."""
    meta = runmeta.read_train_meta(run_dir)
    base = runmeta.recorded_base(meta, run_dir)
    quant = runmeta.recorded_quant(meta, run_dir)
    base_path, notes = None, []
    if base is not None and base.hf_dir is not None:
        base_path = str(Path(base.hf_dir).resolve())
    elif base is not None:
        notes.append(f"base_model_name_or_path is null: the run's base ({runmeta.source_text(meta.get('base'))}) is not "
                     "a Hugging Face directory; `jaxtune convert orbax-to-hf` makes one, then set the field to it")
    bnb = None if quant is None else bnb_load_config(quant)
    if quant is not None:
        merged = f"`jaxtune convert orbax-to-hf {run_dir} DST --merge-lora`"
        how = (f"load it on the 4-bit base: `AutoModelForCausalLM.from_pretrained(BASE, quantization_config="
               f"BitsAndBytesConfig(**{bnb}))`, then `PeftModel.from_pretrained(model, ADAPTER)`; or export the run "
               f"merged: {merged}" if bnb is not None else
               f"bitsandbytes has no equivalent of this quantization: export the run merged instead, {merged}")
        notes.append(f"this adapter was trained against the base quantized as {quant.kind} (blocksize {quant.blocksize}, "
                     f"double_quant {quant.double_quant}); on the 16/32-bit base its outputs differ. To reproduce the "
                     f"run, {how}")
    record = {"run": str(Path(run_dir).resolve()), "base": meta.get("base"),
              "quantization": None if quant is None else to_dict(quant), "bitsandbytes": bnb}
    return base_path, notes, record


def run(args) -> int:
    if args.direction != "peft-to-hf" and args.base is not None:
        raise ValueError("--base applies to peft-to-hf only")
    if args.direction != "orbax-to-hf" and args.merge_lora:
        raise ValueError("--merge-lora applies to orbax-to-hf only (peft-to-hf always merges)")
    runmeta.refuse_run_directory(args.dst, f"jaxtune convert {args.direction}")
    _check_destination(args)
    tokenizer_src = args.src
    if args.direction == "hf-to-orbax":
        stored = read_config(args.src).get("torch_dtype") or read_config(args.src).get("dtype") or "float32"
        dtype = args.dtype or (stored if stored in ("float32", "bfloat16", "float16") else "float32")
        params, cfg = load_hf(args.src, param_dtype=dtype)
        save_model(args.dst, params, cfg, overwrite=args.overwrite)
    elif args.direction == "orbax-to-hf":
        params, cfg, _ = load_model(ModelSource(checkpoint=args.src))
        save_hf(_merged(params, args.merge_lora, args.src), cfg, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                architecture=args.architecture)
    elif args.direction == "orbax-to-peft":
        params, cfg, _ = load_model(ModelSource(checkpoint=args.src))
        if not adapter_leaves(params) and not any(k in params for k in ADDED_KEYS):
            raise ValueError(f"{args.src} carries no PEFT adapter (train with a peft: section)")
        base_path, notes, record = _adapter_provenance(args.src)
        save_adapter(params, cfg, args.dst, overwrite=args.overwrite, use_rslora=_rslora(args.src),
                     base_model_name_or_path=base_path)
        (Path(args.dst) / ADAPTER_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        for note in notes:
            print(note)
    else:
        if args.base is None:
            raise ValueError("peft-to-hf needs --base, the model the adapter was trained on")
        source = _source(args.base)
        params, cfg, _ = load_model(ModelSource(**{**source.__dict__, "adapter": args.src}))
        save_hf(_merged(params, True, args.src), cfg, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                architecture=args.architecture)
        tokenizer_src = args.base
    if has_hf_tokenizer(tokenizer_src):
        load_tokenizer(tokenizer_src, "hf").save(args.dst)
    print(f"wrote {args.dst} ({cfg.family}, {cfg.num_layers} layers, vocab {cfg.vocab_size})")
    return 0
