"""The ``eval:`` section of a job: which evaluations `jaxtune eval` runs and where results go."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

from jaxtune.data.instruct import InstructConfig
from jaxtune.data.sources import SourceConfig

TASK_KINDS = ("loss", "generate", "choice", "classify", "score", "reward")
GSM8K_ANSWER = r"####\s*(-?[\d,]*\.?\d+)"
ANSWER_PRESETS = {"gsm8k": (GSM8K_ANSWER, True)}  # answer_pattern name -> (regex, compare as numbers)


@dataclass(frozen=True)
class EvalTaskConfig:
    """One evaluation. kind:

    - ``loss``: token-weighted loss and perplexity on the job's held-out stream (``sources``
      replace data.eval_sources);
    - ``generate``: greedy KV-cache generation from each record's prompt, scored by exact match
      of the stripped text (default), or of the answer ``answer_pattern`` extracts (its first
      group) from prediction and reference: ``gsm8k`` is the number after ``####``, compared as
      a number;
    - ``choice``: log-likelihood multiple choice: the record's prompt with each of its
      ``choices_field`` continuations, the right one at index ``answer_field``;
    - ``classify``: accuracy and F1 (or MSE for regression) of a classification job's head;
    - ``score``: a reward model's scores of single responses (``prompt`` + ``response_field``: mean,
      std) or of pairs (``prompt`` / ``chosen`` / ``rejected``: pairwise accuracy, mean margin);
    - ``reward``: the evaluated model as a policy: ``completions`` samples per prompt at
      ``temperature`` (0: greedy), scored by a Python ``reward`` (`jaxtune.align.rewards`) or a
      ``reward_model`` run: mean / std reward, share that stopped, mean length; with ``reference``
      (``base``: the adapter-disabled policy, or a model checkpoint directory) also the mean KL of
      the policy to it, ``sum_t log π(y_t) - log π_ref(y_t)`` over its own samples (temperature 1).

    ``shots`` > 0 puts that many solved examples, drawn per example with ``seed`` from
    ``shots_sources`` (default: the training split of the job's data), before each prompt.
    """

    kind: Literal["loss", "generate", "choice", "classify", "score", "reward"] = "loss"
    name: Optional[str] = None  # label in the table (default: the kind)
    sources: tuple[SourceConfig, ...] = ()  # default: the job's held-out split (data.eval_sources / eval_fraction)
    sft: Optional[InstructConfig] = None  # record format / prompts (default: data.sft)
    limit: Optional[int] = None  # the first N examples only
    batch_size: int = 16  # prompts (generate) or continuations (choice) per forward
    shots: int = 0
    shots_sources: tuple[SourceConfig, ...] = ()
    seed: int = 0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()  # generated text is cut at the first of these strings
    answer_pattern: Optional[str] = None  # None: the whole stripped text; a regex (group 1 = the answer); "gsm8k"
    numeric: Optional[bool] = None  # compare answers as numbers ("1,000" == "1000.0"); None: only for "gsm8k"
    choices_field: str = "choices"
    answer_field: str = "answer"
    response_field: str = "response"  # score: the field holding a single response
    samples: int = 5  # predictions kept in the JSON results per task
    reward: Optional[str] = None  # reward: a Python reward function (built-in name or module:function)
    reward_model: Optional[str] = None  # reward: a reward-model run directory (objective.kind=reward)
    completions: int = 4  # reward: samples per prompt
    temperature: float = 1.0  # reward: sampling temperature (0: greedy)
    reference: Optional[str] = None  # reward: KL to "base" (adapter-disabled policy) or a checkpoint directory

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"eval task kind must be one of {' | '.join(TASK_KINDS)}, got {self.kind!r}")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval task {self.label}: {name} must be >= 1, got {getattr(self, name)}")
        if self.shots < 0 or (self.limit is not None and self.limit < 1):
            raise ValueError(f"eval task {self.label}: shots must be >= 0 and limit >= 1")
        if self.kind == "reward":
            if (self.reward is None) == (self.reward_model is None):
                raise ValueError(f"eval task {self.label}: kind reward needs exactly one of reward (a function) "
                                 "and reward_model (a run directory)")
            if self.completions < 1 or self.temperature < 0 or self.shots:
                raise ValueError(f"eval task {self.label}: completions must be >= 1, temperature >= 0, shots 0")
            if self.reference is not None and self.temperature != 1.0:
                raise ValueError(f"eval task {self.label}: the KL to reference is estimated on samples of the policy "
                                 f"itself (temperature 1), got temperature {self.temperature}")
        if self.answer_pattern is not None and self.answer_pattern not in ANSWER_PRESETS:
            try:
                if re.compile(self.answer_pattern).groups < 1:
                    raise ValueError(f"eval task {self.label}: answer_pattern needs one (group) holding the answer")
            except re.error as err:
                raise ValueError(f"eval task {self.label}: answer_pattern is not a regex ({err})") from None

    @property
    def label(self) -> str:
        return self.name or self.kind

    @property
    def answer(self) -> tuple[Optional[str], bool]:
        """(regex or None, compare as numbers): ``answer_pattern`` with its presets resolved."""
        pattern, numeric = ANSWER_PRESETS.get(self.answer_pattern, (self.answer_pattern, False))
        return pattern, numeric if self.numeric is None else self.numeric


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[EvalTaskConfig, ...] = ()  # none: the held-out loss (kind loss)
    output: Optional[str] = None  # JSON results file; default: <checkpoint or .>/eval/<UTC time>.json (never overwritten)
