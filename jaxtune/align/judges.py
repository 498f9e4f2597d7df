"""Judges that rank completions (RLAIF labelling, PPO rewards, the eval tasks that score responses).

- `reward_judge`: a reward model (a run trained with ``objective.kind=reward``) scores prompt +
  completion with its `SCORE` head at the last token;
- `llm_preference`: a language model is asked, with a template, which of two responses is better;
  its verdict is the log-probability of answering ``A`` against ``B``, asked in both orders (to
  cancel position bias); `rank` turns pairwise verdicts into scores by wins.
"""

from __future__ import annotations

from itertools import combinations

import jax
import numpy as np

from jaxtune.data.segments import encode_completions
from jaxtune.models.heads import SCORE, classification_logits
from jaxtune.models.scoring import continuation_rows, sequence_logprobs


def _pad_rows(sequences: list[list[int]], pad: int) -> dict:
    width = -(-max(len(s) for s in sequences) // 16) * 16
    tokens = np.full((len(sequences), width), pad, np.int32)
    seg = np.zeros((len(sequences), width), np.int32)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = s
        seg[i, : len(s)] = 1
    return {"tokens": tokens, "segment_ids": seg, "positions": np.tile(np.arange(width, dtype=np.int32), (len(sequences), 1))}


def reward_judge(model, params, tokenizer, batch_size: int):
    """-> ``score(prompts, completions) -> [n]`` under a reward model's score head."""
    if SCORE not in params or params[SCORE]["kernel"].shape[-1] != 1:
        raise ValueError("the reward judge needs a reward model (a run trained with objective.kind=reward)")
    fn = jax.jit(lambda p, b: classification_logits(model, p, b, pooling="last")[:, 0])
    pad = int(model.cfg.pad_token_id or 0)

    def score(prompts: list[str], completions: list[str]) -> np.ndarray:
        # tokenized as the reward model's training pairs were (jaxtune.data.segments)
        ids = [p + c for p, (c,) in encode_completions(tokenizer, [(p, [c]) for p, c in zip(prompts, completions)])]
        out = []
        for start in range(0, len(ids), batch_size):
            chunk = ids[start: start + batch_size]
            rows = _pad_rows(chunk + [chunk[0]] * (batch_size - len(chunk)), pad)
            out.append(np.asarray(fn(params, rows))[: len(chunk)])
        return np.concatenate(out)

    return score


def llm_preference(model, params, tokenizer, template: str, batch_size: int):
    """-> ``prefer(prompt, a, b) -> float``: log p("A") - log p("B") after the judge prompt, averaged
    over both orders (positive: a is better)."""
    a_ids, b_ids = list(tokenizer.encode(" A")), list(tokenizer.encode(" B"))
    pad = int(model.cfg.pad_token_id or 0)

    def prefer_many(triples: list[tuple[str, str, str]]) -> np.ndarray:
        pairs = []
        for prompt, a, b in triples:
            for first, second in ((a, b), (b, a)):
                context = list(tokenizer.encode(template.format(prompt=prompt, a=first, b=second)))
                pairs += [(context, a_ids), (context, b_ids)]
        scores = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start: start + batch_size]
            rows = chunk + [chunk[0]] * (batch_size - len(chunk))
            width = -(-max(len(c) + len(x) - 1 for c, x in rows) // 16) * 16
            scores.append(np.asarray(sequence_logprobs(model, params, continuation_rows(rows, width, pad))[0])[: len(chunk)])
        s = np.concatenate(scores).reshape(len(triples), 2, 2)  # [triple, order, answer A/B]
        return 0.5 * ((s[:, 0, 0] - s[:, 0, 1]) + (s[:, 1, 1] - s[:, 1, 0]))

    return prefer_many


def rank(completions: list[str], prefer: np.ndarray) -> np.ndarray:
    """Scores from pairwise preferences (``prefer[k]`` for the k-th pair of `combinations`): wins,
    ties broken by the summed preference."""
    wins, total = np.zeros(len(completions)), np.zeros(len(completions))
    for k, (i, j) in enumerate(combinations(range(len(completions)), 2)):
        wins[i if prefer[k] > 0 else j] += 1
        total[i] += prefer[k]
        total[j] -= prefer[k]
    return wins + 1e-3 * np.tanh(total)
