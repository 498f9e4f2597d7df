"""Eval task ``reward``: the restored model as a policy. Completions are sampled for each held-out
prompt with the jitted KV-cache sampler (the one the PPO / GRPO rollouts use), scored by a Python
reward or a reward-model run; with a reference, the KL of the policy to it is estimated on those
samples, ``KL(π || π_ref) ≈ mean over samples of Σ_t log π(y_t) - log π_ref(y_t)`` (unbiased
because the samples come from π itself, at temperature 1)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import numpy as np

from jaxtune.align.rewards import reward_function
from jaxtune.align.rollout import empty_rollout_rows, prompt_items, sample_completions, write_completion
from jaxtune.eval.config import EvalTaskConfig
from jaxtune.generate.sampling import SamplingConfig
from jaxtune.generate.text import stop_tokens_of
from jaxtune.models.scoring import jitted_token_logps
from jaxtune.peft.core import ADDED_KEYS, adapter_leaves, base_model

Scorer = Callable[[list[str], list[str]], np.ndarray]  # (prompts, completions) -> scores


def policy_reward(task: EvalTaskConfig, model, params: Any, tokenizer, records, sft, *, add_bos: bool = False,
                  scorer: Optional[Scorer] = None, reference: Optional[tuple[Any, Any]] = None) -> dict:
    """``scorer``: the task's reward model as a judge (`jaxtune.align.judges.reward_judge`), when it
    names one; ``reference``: (model, params) of the KL reference, when it names a checkpoint
    (``reference: base`` is the policy's adapter-disabled self, `base_reference`)."""
    items = prompt_items(records, sft, tokenizer, add_bos=add_bos, max_new_tokens=task.max_new_tokens)
    seq_len = -(-max(len(it.ids) for it in items) // 16) * 16 + task.max_new_tokens
    stops = stop_tokens_of(tokenizer, model.cfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (model.cfg.pad_token_id or 0)
    sampling = SamplingConfig(max_new_tokens=task.max_new_tokens, temperature=task.temperature or 1.0,
                              greedy=task.temperature == 0, stop_tokens=stops, pad_token_id=int(pad))
    if task.reference == "base":
        reference = base_reference(task, model, params)
    elif task.reference is not None and reference is None:
        raise ValueError(f"eval task {task.label}: reference {task.reference} must be loaded by the caller")
    jobs = [i for i in range(len(items)) for _ in range(task.completions)]
    texts, stopped, lengths, kls = [], [], [], []
    for start in range(0, len(jobs), task.batch_size):
        chunk = jobs[start: start + task.batch_size]
        padded = chunk + [chunk[0]] * (task.batch_size - len(chunk))  # one batch shape: one compilation
        out = sample_completions(model, params, [items[i].ids for i in padded],
                                 jax.random.fold_in(jax.random.key(task.seed), start), sampling)
        rows = empty_rollout_rows(len(padded), seq_len)
        for row, i in enumerate(chunk):
            completion = [int(t) for t in out.tokens[row, : out.lengths[row]]]
            write_completion(rows, row, items[i].ids, completion)
            texts.append(tokenizer.decode([t for t in completion if t not in stops]))
            stopped.append(bool(out.stopped[row]))
            lengths.append(int(out.lengths[row]))
        if reference is not None:
            ref_model, ref_params = reference
            own = np.asarray(jitted_token_logps(model, params, rows))
            kl = own - np.asarray(jitted_token_logps(ref_model, ref_params, rows))
            kls.extend(kl.sum(1)[: len(chunk)].tolist())
    if task.reward is not None:
        fn = reward_function(task.reward)
        scores = np.asarray([fn(text, items[i].reference, items[i].record) for text, i in zip(texts, jobs)], np.float64)
    else:
        if scorer is None:
            raise ValueError(f"eval task {task.label}: reward_model {task.reward_model} must be loaded by the caller")
        scores = np.asarray(scorer([items[i].text for i in jobs], texts), np.float64)
    result = {"reward_mean": float(scores.mean()), "reward_std": float(scores.std()), "prompts": len(items),
              "completions": len(jobs), "stopped": float(np.mean(stopped)), "mean_new_tokens": float(np.mean(lengths))}
    if reference is not None:
        result["kl"] = float(np.mean(kls))
    result["samples"] = [{"where": items[i].where, "completion": text, "stopped": stop, "reward": float(r)}
                         for text, i, stop, r in list(zip(texts, jobs, stopped, scores))[: task.samples]]
    return result


def base_reference(task: EvalTaskConfig, model, params: Any) -> tuple[Any, Any]:
    """``reference: base``: (model, the policy with its adapters disabled; no copy)."""
    if not adapter_leaves(params) and not any(k in params for k in ADDED_KEYS):
        raise ValueError(f"eval task {task.label}: reference=base needs a PEFT policy (this model has no adapters "
                         "to disable); give the reference's checkpoint directory instead")
    return model, base_model(params)
