"""Names and modules that moved: code written against the old spelling fails with the new one in the
message (and imports nothing).

`moved_names` gives a module a ``__getattr__`` for names that left it; `MovedModules`, installed
on ``sys.meta_path`` by ``jaxtune/__init__.py``, answers the import of a module that left. Both
raise ImportError (not AttributeError, which ``from m import name`` would replace with its own
message that names no new home).
"""

from __future__ import annotations

import importlib.abc
from typing import Callable

# old module -> where its contents went
MOVED_MODULES = {
    "jaxtune.train.runner": "jaxtune.job (run_training, setup_training) and jaxtune.job.streams; "
                            "run_evaluation(job) is run_eval_job(job)['loss']",
    "jaxtune.eval.runner": "jaxtune.job.evaluate (run_eval_job, write_results) and jaxtune.eval.report (format_table)",
    "jaxtune.interop.sources": "jaxtune.job.assemble (load_model; also jaxtune.job.load_model)",
    "jaxtune.config.schema": "jaxtune.job.schema (TrainJobConfig, JobConfig, ModelSource, TokenizerConfig, "
                             "ObjectiveConfig; also importable from jaxtune.job)",
    "jaxtune.align.objectives": "jaxtune.align.preference (dpo_loss, reward_loss, precompute_reference, "
                                "PreferenceObjectiveConfig)",
    "jaxtune.eval.scoring": "jaxtune.models.scoring (continuation_rows, sequence_logprobs, completion_logps, "
                            "token_logps)",
    "jaxtune.align.label": "jaxtune.job.label (LabelJobConfig, label), jaxtune.align.judges (reward_judge, "
                           "llm_preference, rank) and jaxtune.job.assemble.load_reward_judge",
}


def moved_names(module: str, new_homes: dict[str, str]) -> Callable[[str], object]:
    """-> a module-level ``__getattr__``: ``new_homes`` maps an old name to its new ``module.name``."""

    def __getattr__(name: str):
        if name in new_homes:
            raise ImportError(f"{module}.{name} moved: use {new_homes[name]}")
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


class MovedModules(importlib.abc.MetaPathFinder):
    """Consulted after the ordinary finders: a module in `MOVED_MODULES` is an ImportError that says
    where its contents are now."""

    def find_spec(self, fullname, path, target=None):
        if fullname in MOVED_MODULES:
            raise ImportError(f"{fullname} moved: use {MOVED_MODULES[fullname]}", name=fullname)
        return None
