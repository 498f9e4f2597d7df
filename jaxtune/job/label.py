"""`jaxtune label`, AI-feedback labelling (RLAIF): sample several completions per prompt from a
policy, rank them with a judge (`jaxtune.align.judges`), write the best and the worst as a
preference pair that DPO trains on directly.

Judges:

- ``reward``: a reward model (a run trained with ``objective.kind=reward``) scores prompt +
  completion at the last token;
- ``llm``: a language model is asked, with ``judge_template``, which of two responses is better;
  its verdict is the log-probability of answering ``A`` against ``B``, asked in both orders (to
  cancel position bias). With more than two samples every completion is compared with every other
  and ranked by wins (ties by summed preference).

Output: JSONL rows ``{"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "judge"}``;
prompts whose samples are all identical are counted and skipped (no preference to learn).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Literal, Optional

import jax
import numpy as np

from jaxtune.align.judges import llm_preference, rank, reward_judge
from jaxtune.data.sft import read_records
from jaxtune.data.sources import SourceConfig, build_source
from jaxtune.data.tokenizer import load_tokenizer
from jaxtune.generate import generate, left_pad
from jaxtune.generate.sampling import SamplingConfig
from jaxtune.generate.text import stop_tokens_of
from jaxtune.job.assemble import load_model
from jaxtune.job.schema import ModelSource, TokenizerConfig
from jaxtune.models import Model

log = logging.getLogger(__name__)
JUDGE_TEMPLATE = ("Which response answers the prompt better?\n\nPrompt: {prompt}\n\nResponse A: {a}\n\n"
                  "Response B: {b}\n\nThe better response is")


@dataclass(frozen=True)
class LabelJobConfig:
    """`jaxtune label`: policy, prompts, judge, output."""

    policy: ModelSource = field(default_factory=lambda: ModelSource(preset="tiny-llama"))
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # the policy's (default: beside it)
    prompts: tuple[SourceConfig, ...] = ()  # records with a prompt field
    prompt_field: str = "prompt"
    prompt_format: str = "{prompt}"
    limit: Optional[int] = None
    samples: int = 2  # completions per prompt (>= 2)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=32, temperature=1.0))
    judge: Literal["reward", "llm"] = "reward"
    judge_model: Optional[ModelSource] = None  # default: the policy itself (llm judge)
    judge_template: str = JUDGE_TEMPLATE
    batch_size: int = 16
    seed: int = 0
    output: str = "preferences.jsonl"

    def __post_init__(self):
        if self.samples < 2:
            raise ValueError(f"label.samples must be >= 2 to form a pair, got {self.samples}")
        if self.judge == "reward" and self.judge_model is None:
            raise ValueError("judge=reward needs judge_model (a reward-model run: objective.kind=reward)")
        for key in ("{prompt}", "{a}", "{b}"):
            if key not in self.judge_template:
                raise ValueError(f"judge_template must contain {key}")


def label(cfg: LabelJobConfig) -> dict:
    """Run the labelling job; -> counts (prompts, pairs written, skipped) and the output path."""
    output = Path(cfg.output)
    if output.exists():
        raise FileExistsError(f"label.output {output} exists (labels are never overwritten); give a new path")
    if not cfg.prompts:
        raise ValueError("label.prompts: give at least one source of prompts")
    params, mcfg, directory = load_model(cfg.policy)
    tokenizer = load_tokenizer(cfg.tokenizer.path or directory, cfg.tokenizer.kind)
    policy = Model(mcfg)
    counts: Counter = Counter()
    records = read_records([build_source(c) for c in cfg.prompts], "all", 0.05, on_bad_row="error", counts=counts)
    if cfg.limit is not None:
        records = records[: cfg.limit]
    prompts = []
    for record, where in records:
        if cfg.prompt_field not in record or not isinstance(record[cfg.prompt_field], str):
            raise ValueError(f"{where}: no text field {cfg.prompt_field!r}")
        prompts.append(cfg.prompt_format.format(prompt=record[cfg.prompt_field]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (mcfg.pad_token_id or 0)
    sampling = dataclasses.replace(cfg.sampling, stop_tokens=cfg.sampling.stop_tokens or stop_tokens_of(tokenizer, mcfg),
                                   pad_token_id=int(pad))
    samples: list[list[str]] = [[] for _ in prompts]
    rng = jax.random.key(cfg.seed)
    jobs = [(i, k) for i in range(len(prompts)) for k in range(cfg.samples)]
    for start in range(0, len(jobs), cfg.batch_size):
        chunk = jobs[start: start + cfg.batch_size]
        ids = [list(tokenizer.encode(prompts[i])) for i, _ in chunk]
        ids += [ids[0]] * (cfg.batch_size - len(ids))
        width = -(-max(len(x) for x in ids) // 16) * 16
        tokens, mask = left_pad(ids, sampling.pad_token_id, length=width)
        rng, key = jax.random.split(rng)
        out = jax.device_get(generate(policy, params, tokens, mask, key, sampling))
        for row, (i, _) in enumerate(chunk):
            new = [int(t) for t in out.tokens[row, : out.lengths[row]] if int(t) not in sampling.stop_tokens]
            samples[i].append(tokenizer.decode(new))
    if cfg.judge == "reward":
        jparams, jcfg, _ = load_model(cfg.judge_model)
        score = reward_judge(Model(jcfg), jparams, tokenizer, cfg.batch_size)
        flat = score([p for p, s in zip(prompts, samples) for _ in s], [c for s in samples for c in s])
        scores = flat.reshape(len(prompts), cfg.samples)
    else:
        jparams, jcfg = (params, mcfg) if cfg.judge_model is None else load_model(cfg.judge_model)[:2]
        prefer = llm_preference(Model(jcfg), jparams, tokenizer, cfg.judge_template, cfg.batch_size)
        triples = [(p, s[i], s[j]) for p, s in zip(prompts, samples) for i, j in combinations(range(cfg.samples), 2)]
        verdicts = prefer(triples).reshape(len(prompts), -1)
        scores = np.stack([rank(s, v) for s, v in zip(samples, verdicts)])
    output.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(output, "x", encoding="utf-8") as f:
        for prompt, options, s in zip(prompts, samples, scores):
            best, worst = int(np.argmax(s)), int(np.argmin(s))
            if options[best] == options[worst] or s[best] == s[worst]:
                counts["no_preference"] += 1
                continue
            if not options[best].strip() or not options[worst].strip():
                counts["empty_completion"] += 1
                continue
            f.write(json.dumps({"prompt": prompt, "chosen": options[best], "rejected": options[worst],
                                "chosen_score": float(s[best]), "rejected_score": float(s[worst]),
                                "judge": cfg.judge}) + "\n")
            written += 1
    if counts:
        log.warning("label: %d of %d prompts gave no pair: %s", sum(counts.values()), len(prompts), dict(counts))
    return {"prompts": len(prompts), "pairs": written, "skipped": dict(counts), "output": str(output)}
