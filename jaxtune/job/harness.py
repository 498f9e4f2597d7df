"""EleutherAI's lm-evaluation-harness on jaxtune models: ``--model jaxtune``.

``jaxtune lm-eval --model jaxtune --model_args checkpoint=runs/x,batch_size=8 --tasks ...`` runs
lm-eval's own command line with this backend registered (lm-eval 0.4 resolves ``--model`` against
its registry before any user code runs, so ``lm_eval`` alone does not know it); from Python,
``import jaxtune.job.harness`` registers it for ``lm_eval.simple_evaluate(model="jaxtune", ...)``,
or pass ``JaxtuneLM(...)`` as the model. Model arguments: ``checkpoint`` (a jaxtune run or params
checkpoint, PEFT and QLoRA runs included) or ``hf_dir`` (a Hugging Face directory), ``adapter`` (a
PEFT adapter directory put on), ``tokenizer`` (default: the model's directory), ``batch_size``,
``max_length`` (default: the model's context), ``max_gen_toks`` (256), ``dtype`` / ``param_dtype``,
``attention_impl``, ``add_bos_token`` (false, as lm-eval's ``hf`` backend), ``fsdp`` / ``tensor`` (the
mesh the params are sharded over, by jaxtune's rules, as ``jaxtune eval`` restores them; the rest of
the devices form the data axis). ``--apply_chat_template`` renders requests with the tokenizer's chat
template as the ``hf`` backend does.

Requests run on jaxtune's jitted forward (`jaxtune.models.scoring.sequence_logprobs`) and KV-cache
sampler in batches of ``batch_size`` rows padded to a few lengths (multiples of 64 up to 256, then
powers of two), so a whole evaluation compiles a handful of programs. Tokenization follows lm-eval's
``TemplateLM`` (context and continuation split as its ``hf`` backend splits them; rolling windows
from ``lm_eval.utils``), so the figures are comparable with the ``hf`` backend's on the same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import jax
import numpy as np

from jaxtune.data.tokenizer import BYTE_TOKENIZER_FILE, has_hf_tokenizer, load_tokenizer
from jaxtune.generate import generate, left_pad
from jaxtune.generate.sampling import SamplingConfig
from jaxtune.generate.text import cut_at_stops, stop_tokens_of
from jaxtune.job.assemble import load_model
from jaxtune.job.schema import ModelSource
from jaxtune.models import Model
from jaxtune.models.scoring import continuation_rows, sequence_logprobs
from jaxtune.parallel.mesh import MeshConfig, make_mesh
from jaxtune.parallel.rules import param_shardings

try:
    import lm_eval.models  # noqa: F401  lm-eval's own backends first (it skips them once its registry is non-empty)
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as err:  # the optional extra
    raise ImportError("the lm-evaluation-harness backend needs lm-eval: pip install 'jaxtune[eval]'") from err


def padded_length(n: int) -> int:
    """The row length ``n`` tokens are padded to: multiples of 64 up to 256, then powers of two."""
    if n <= 256:
        return max(64, -(-n // 64) * 64)
    return 1 << (n - 1).bit_length()


def tokenizer_directory(directory) -> Path:
    """``directory`` when it holds a tokenizer (HF files or a saved jaxtune one); otherwise an error, never
    a silent fallback to bytes (a run trained on synthetic data saves none)."""
    path = Path(directory)
    if not (has_hf_tokenizer(path) or (path / BYTE_TOKENIZER_FILE).exists()):
        raise ValueError(f"{path}: no tokenizer here (HF tokenizer files or {BYTE_TOKENIZER_FILE}); pass "
                         "tokenizer=DIR in --model_args")
    return path


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("jaxtune")
class JaxtuneLM(TemplateLM):
    """lm-eval's ``LM`` interface over a jaxtune model (module docstring)."""

    def __init__(self, checkpoint: Optional[str] = None, hf_dir: Optional[str] = None, adapter: Optional[str] = None,
                 tokenizer: Optional[str] = None, batch_size: int | str = 8, max_length: Optional[int] = None,
                 max_gen_toks: int = 256, dtype: str = "float32", param_dtype: str = "float32",
                 attention_impl: str = "auto", add_bos_token: bool | str = False, seed: int = 0,
                 fsdp: int = 1, tensor: int = 1, **unused):
        super().__init__()
        if unused:
            raise ValueError(f"--model jaxtune: unknown model_args {sorted(unused)} (checkpoint, hf_dir, adapter, "
                             "tokenizer, batch_size, max_length, max_gen_toks, dtype, param_dtype, attention_impl, "
                             "add_bos_token, seed, fsdp, tensor)")
        if str(batch_size).startswith("auto"):
            raise ValueError("--model jaxtune: batch_size must be a number (a fixed batch shape compiles once)")
        source = ModelSource(checkpoint=checkpoint, hf_dir=hf_dir, adapter=adapter, dtype=dtype,
                             param_dtype=param_dtype, attention_impl=attention_impl)
        params, self.cfg, directory = load_model(source)
        # on every device, as jaxtune eval: params by the sharding rules over fsdp / tensor, rows over data
        self.mesh = make_mesh(MeshConfig(data=-1, fsdp=int(fsdp), tensor=int(tensor)))
        self.params = jax.device_put(params, param_shardings(params, self.mesh, warn=False))
        self.model = Model(self.cfg)
        self.tok = load_tokenizer(tokenizer_directory(tokenizer or directory))
        self.tokenizer = getattr(self.tok, "tokenizer", None)  # a transformers tokenizer: lm-eval's chat templates
        if self.tok.vocab_size > self.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {self.tok.vocab_size} tokens, the model's vocab_size is "
                             f"{self.cfg.vocab_size}")
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or self.cfg.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _flag(add_bos_token)
        self.seed = int(seed)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.cfg.pad_token_id or 0)
        self.pad_id = int(pad)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None) -> "JaxtuneLM":
        """lm-eval's constructor hook: ``--model_args`` win over the command line's ``--batch_size``
        (whose default is 1); its ``device`` / ``max_batch_size`` do not apply (jaxtune runs on the
        JAX devices with one batch shape)."""
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in arg_dict and k not in ("device", "max_batch_size")}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "JaxtuneLM":
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    # --- tokens -------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.cfg.eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0]
        if eos is None:
            raise ValueError("--model jaxtune: neither the tokenizer nor the model has an EOS token, which lm-eval "
                             "uses to score a continuation with no context")
        return int(eos)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tok.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return type(self.tok).__name__

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return list(self.tok.encode(string, add_bos=add))

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(list(tokens))

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's ``--apply_chat_template``: the tokenizer's template rendered as its ``hf`` backend
        renders it (the last message continued when no generation prompt is asked for)."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("--apply_chat_template: the model's tokenizer has no chat template")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # --- scoring ------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(key, context ids, continuation ids) -> (sum log p(continuation), whether it is the greedy one);
        the last ``max_length + 1`` tokens are kept, as the ``hf`` backend keeps them."""
        pairs = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            n = min(len(continuation), len(whole) - 1)
            pairs.append((whole[:-n], whole[-n:]))
        return self._score(pairs)

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        out: list[Optional[tuple[float, bool]]] = [None] * len(pairs)
        by_length: dict[int, list[int]] = {}
        for i, (context, continuation) in enumerate(pairs):
            by_length.setdefault(padded_length(len(context) + len(continuation) - 1), []).append(i)
        for width, indices in sorted(by_length.items()):
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start: start + self.batch_size]
                rows = [pairs[i] for i in chunk]
                rows += [rows[0]] * (self.batch_size - len(rows))  # one batch shape per width
                logp, greedy = sequence_logprobs(self.model, self.params, continuation_rows(rows, width, self.pad_id))
                logp, greedy = jax.device_get((logp, greedy))
                for j, i in enumerate(chunk):
                    out[i] = (float(logp[j]), bool(greedy[j]))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood over disjoint windows of ``max_length`` tokens, the first
        predicted from ``prefix_token_id`` (lm-eval's rolling windows)."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((list(context), list(continuation)))
                owners.append(i)
        totals = np.zeros(len(requests))
        for owner, (logp, _) in zip(owners, self._score(windows)):
            totals[owner] += logp
        return [float(t) for t in totals]

    # --- generation ---------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, ``do_sample``) continuations cut at the request's ``until`` strings and at
        EOS, batched by generation settings and padded prompt length."""
        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = _flag(kwargs.pop("do_sample", False)) and float(kwargs.get("temperature", 1.0)) > 0
            temperature = float(kwargs.pop("temperature", 1.0)) if sample else 1.0
            keep = max(self.max_length - max_new, 1)  # the prompt's last tokens that leave room for max_new
            ids = self.tok_encode(context)[-keep:] if context else [self.prefix_token_id]
            settings.append((ids, until))
            key = (padded_length(len(ids)), max_new, sample, temperature, float(kwargs.pop("top_p", 1.0)))
            groups.setdefault(key, []).append(i)
        out: list[Optional[str]] = [None] * len(requests)
        stops = stop_tokens_of(self.tok, self.cfg)
        for (width, max_new, sample, temperature, top_p), indices in sorted(groups.items()):
            # slide: a learned-position model keeps generating past its context from its last half
            sampling = SamplingConfig(max_new_tokens=max_new, greedy=not sample, temperature=temperature,
                                      top_p=top_p, stop_tokens=stops, pad_token_id=self.pad_id, slide=True)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start: start + self.batch_size]
                rows = [settings[i][0] for i in chunk]
                rows += [rows[0]] * (self.batch_size - len(rows))
                tokens, mask = left_pad(rows, self.pad_id, length=width)
                gen = jax.device_get(generate(self.model, self.params, tokens, mask,
                                              jax.random.key(self.seed + start), sampling))
                for j, i in enumerate(chunk):
                    new = [int(t) for t in gen.tokens[j, : gen.lengths[j]] if int(t) not in stops]
                    out[i] = cut_at_stops(self.tok_decode(new), settings[i][1])
        return out


def main(argv: Optional[list[str]] = None) -> int:
    """lm-eval's command line with ``--model jaxtune`` registered (``jaxtune lm-eval ...``)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
