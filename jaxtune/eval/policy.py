"""Eval task ``reward``: the restored model as a policy. Completions are sampled for each held-out
prompt with the jitted KV-cache sampler (the one the PPO / GRPO rollouts use), scored by a Python
reward or a reward-model run; with a reference, the KL of the policy to it is estimated on those
samples, ``KL(π || π_ref) ≈ mean over samples of Σ_t log π(y_t) - log π_ref(y_t)`` (unbiased
because the samples come from π itself, at temperature 1)."""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np

from jaxtune.eval.config import EvalTaskConfig


def policy_reward(task: EvalTaskConfig, model, params: Any, tokenizer, records, sft, *, add_bos: bool = False,
                  numerics: Optional[dict] = None) -> dict:
    """``numerics``: param_dtype / dtype / attention_impl for the reward model and the reference."""
    from jaxtune.align.grpo import _token_logps, empty_rollout_rows, prompt_items, sample_completions, write_completion
    from jaxtune.align.rewards import reward_function
    from jaxtune.eval.tasks import stop_tokens_of
    from jaxtune.generate.sampling import SamplingConfig

    items = prompt_items(records, sft, tokenizer, add_bos=add_bos, max_new_tokens=task.max_new_tokens)
    seq_len = -(-max(len(it.ids) for it in items) // 16) * 16 + task.max_new_tokens
    stops = stop_tokens_of(tokenizer, model.cfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (model.cfg.pad_token_id or 0)
    sampling = SamplingConfig(max_new_tokens=task.max_new_tokens, temperature=task.temperature or 1.0,
                              greedy=task.temperature == 0, stop_tokens=stops, pad_token_id=int(pad))
    reference = kl_reference(task, model, params, numerics)
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
            kl = np.asarray(_token_logps(model, params, rows)) - np.asarray(_token_logps(ref_model, ref_params, rows))
            kls.extend(kl.sum(1)[: len(chunk)].tolist())
    if task.reward is not None:
        fn = reward_function(task.reward)
        scores = np.asarray([fn(text, items[i].reference, items[i].record) for text, i in zip(texts, jobs)], np.float64)
    else:
        from jaxtune.align.label import load_reward_judge

        score = load_reward_judge(task.reward_model, tokenizer, task.batch_size, **(numerics or {}))
        scores = np.asarray(score([items[i].text for i in jobs], texts), np.float64)
    result = {"reward_mean": float(scores.mean()), "reward_std": float(scores.std()), "prompts": len(items),
              "completions": len(jobs), "stopped": float(np.mean(stopped)), "mean_new_tokens": float(np.mean(lengths))}
    if reference is not None:
        result["kl"] = float(np.mean(kls))
    result["samples"] = [{"where": items[i].where, "completion": text, "stopped": stop, "reward": float(r)}
                         for text, i, stop, r in list(zip(texts, jobs, stopped, scores))[: task.samples]]
    return result


def kl_reference(task: EvalTaskConfig, model, params: Any, numerics: Optional[dict] = None) -> Optional[tuple[Any, Any]]:
    """-> (model, params) of the task's KL reference, or None: ``base`` is the policy with its
    adapters disabled (no copy), anything else a model checkpoint directory."""
    if task.reference is None:
        return None
    if task.reference == "base":
        from jaxtune.peft.core import ADDED_KEYS, adapter_leaves, base_model

        if not adapter_leaves(params) and not any(k in params for k in ADDED_KEYS):
            raise ValueError(f"eval task {task.label}: reference=base needs a PEFT policy (this model has no adapters "
                             "to disable); give the reference's checkpoint directory instead")
        return model, base_model(params)
    from jaxtune.config.schema import ModelSource
    from jaxtune.interop.sources import load_model
    from jaxtune.models import Model

    ref_params, ref_cfg, _ = load_model(ModelSource(checkpoint=task.reference, **(numerics or {})))
    if ref_cfg.vocab_size != model.cfg.vocab_size:
        raise ValueError(f"eval task {task.label}: reference {task.reference} has vocab_size {ref_cfg.vocab_size}, "
                         f"the policy {model.cfg.vocab_size} (the KL needs the same tokenizer)")
    return Model(ref_cfg.replace(remat="none")), ref_params
