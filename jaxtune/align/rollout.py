"""What the RL rollouts (GRPO, PPO) and the policy evaluations share: prompts rendered from records,
completions sampled with the jitted KV-cache sampler, LM rows of prompt + completion (scored with
`jaxtune.models.scoring.token_logps`), and the stream side the loop hands the policy to."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from jaxtune.data.instruct import generation_prompt
from jaxtune.generate import generate, left_pad
from jaxtune.generate.text import encode_prompt
from jaxtune.utils.partition import join

LENGTH_BUCKET = 16  # prompt lengths are rounded up to a multiple of this (fewer compilations)


class Prompt(NamedTuple):
    """A rollout prompt: its ids, the reference answer rewards check, the record, the rendered text
    (what a reward model reads) and where the record came from."""

    ids: list
    reference: str
    record: dict
    text: str
    where: str


def prompt_items(records, sft, tokenizer, *, add_bos: bool, max_new_tokens: int,
                 seq_len: Optional[int] = None) -> list[Prompt]:
    """Each record rendered as a generation prompt; with ``seq_len``, a prompt that leaves no room
    for ``max_new_tokens`` in a row is an error naming the record."""
    items = []
    for record, where in records:
        prompt, reference = generation_prompt(record, where, sft, tokenizer)
        ids = encode_prompt(tokenizer, prompt, add_bos)
        if seq_len is not None and len(ids) + max_new_tokens > seq_len + 1:
            raise ValueError(f"{where}: prompt of {len(ids)} tokens + max_new_tokens {max_new_tokens} exceed "
                             f"train.seq_len + 1 = {seq_len + 1}")
        items.append(Prompt(ids, reference, record, prompt, where))
    if not items:
        raise ValueError("RL fine-tuning: no prompts")
    return items


def prompt_order(seed: int, count: int, start: int, n: int) -> list[int]:
    """Indices ``start .. start + n`` of an endless visit of ``count`` prompts, in a seeded
    permutation per pass over them."""
    out = []
    for k in range(start, start + n):
        epoch, offset = divmod(k, count)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(count)[offset]))
    return out


def empty_rollout_rows(n: int, seq_len: int) -> dict:
    rows = {k: np.zeros((n, seq_len), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
    rows["loss_mask"] = np.zeros((n, seq_len), np.float32)
    return rows


def write_completion(rows: dict, row: int, prompt: list[int], completion: list[int]) -> int:
    """Prompt + sampled completion into an LM row, loss on the completion's tokens; -> index of the
    last target position."""
    seq = list(prompt) + list(completion)
    n = len(seq) - 1
    rows["tokens"][row, :n], rows["targets"][row, :n] = seq[:-1], seq[1:]
    rows["segment_ids"][row, :n] = 1
    rows["positions"][row, :n] = np.arange(n)
    rows["loss_mask"][row, len(prompt) - 1: n] = 1.0
    return n - 1


def sample_completions(model, policy, prompts: list[list[int]], key, sampling):
    """Left-padded prompts (length rounded up to 16) through the jitted sampler -> host `Generation`."""
    width = -(-max(len(p) for p in prompts) // LENGTH_BUCKET) * LENGTH_BUCKET
    tokens, mask = left_pad(prompts, sampling.pad_token_id, length=width)
    return jax.device_get(generate(model, policy, tokens, mask, key, sampling))


class PolicyStream:
    """The part of a rollout stream the training loop talks to: before each step it hands over the
    current policy (`set_policy`, the trainable and frozen halves) to sample from."""

    process_local = False
    policy: Any = None

    def set_policy(self, trainable: Any, frozen: Any) -> None:
        self.policy = join(trainable, frozen)

    def __iter__(self):
        return self

    def require_policy(self) -> None:
        if self.policy is None:
            raise RuntimeError(f"{type(self).__name__}: the loop must hand it the policy (set_policy) before a rollout")
