"""Objectives as plug-ins: the registry covers every objective.kind, each objective owns its data kinds,
head and reference, and no module outside jaxtune/job/objectives tests an objective's name."""

import ast
from pathlib import Path

import pytest

from jaxtune.config import from_dict
from jaxtune.job import TrainJobConfig
from jaxtune.job.objectives import Context, get_objective, registered
from jaxtune.job.schema import OBJECTIVES
from jaxtune.job.streams import check_data_kind
from jaxtune.models.heads import SCORE, VALUE_HEAD, HeadSpec
from jaxtune.models.presets import preset

ROOT = Path(__file__).resolve().parents[2]
CFG = preset("tiny-llama")


def _job(**sections):
    return from_dict(TrainJobConfig, {"model": {"preset": "tiny-llama"}, **sections})


def test_every_objective_kind_is_registered_once():
    assert registered() == tuple(sorted(OBJECTIVES))
    for name in OBJECTIVES:
        assert get_objective(name).name == name
    with pytest.raises(ValueError, match="no objective 'span' is registered"):
        get_objective("span")


@pytest.mark.parametrize("kind,head", [
    ("causal", None), ("masked", None), ("sft", None), ("dpo", None), ("grpo", None),
    ("classification", HeadSpec(SCORE, outputs=5, pooling="mean")), ("regression", HeadSpec(SCORE, 1, "mean")),
    ("reward", HeadSpec(SCORE, 1, "mean")), ("ppo", HeadSpec(VALUE_HEAD, pooling="mean")),
])
def test_heads_come_from_the_objective(kind, head):
    job = _job(objective={"kind": kind, "num_labels": 5, "pooling": "mean"})
    assert get_objective(kind).head(Context(job, CFG)) == head


def test_data_kinds_are_the_objectives():
    for kind, data in [("causal", "classification"), ("masked", "sft"), ("dpo", "text"), ("grpo", "preference")]:
        job = _job(objective={"kind": kind}, data={"kind": data, "path": "x.txt", "sources": [{"path": "x.jsonl"}]})
        with pytest.raises(ValueError, match=f"data.kind={data} and objective.kind={kind} do not go together"):
            check_data_kind(job, get_objective(kind).data_kinds)
    with pytest.raises(ValueError, match="num_labels must be >= 2 for classification"):
        get_objective("classification").head(Context(_job(objective={"kind": "classification", "num_labels": 1}), CFG))


@pytest.mark.parametrize("kind,peft,extra,want", [
    ("dpo", True, {}, "adapter"), ("dpo", False, {}, "precomputed"), ("dpo", True, {"loss": "orpo"}, "none"),
    ("grpo", True, {}, "adapter"), ("grpo", False, {}, "none"), ("grpo", False, {"kl_coef": 0.1}, "batch"),
    ("causal", True, {}, "none"),
])
def test_reference_policy(kind, peft, extra, want):
    section = {"preference": extra} if kind == "dpo" else {"grpo": extra} if kind == "grpo" else {}
    job = _job(objective={"kind": kind, **section}, peft={"lora": {"rank": 2}} if peft else {})
    assert get_objective(kind).reference(job) == want


def test_masked_lm_attends_both_ways():
    assert get_objective("masked").model_config(CFG).causal is False
    assert get_objective("causal").model_config(CFG) == CFG


def test_only_the_objective_modules_test_an_objective_name():
    """A comparison with ``<...>.objective.kind`` anywhere else is the old string dispatch coming back."""
    found = []
    for path in sorted((ROOT / "jaxtune").rglob("*.py")):
        if "objectives" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for side in (node.left, *node.comparators):
                    if (isinstance(side, ast.Attribute) and side.attr == "kind" and isinstance(side.value, ast.Attribute)
                            and side.value.attr == "objective"):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"objective names tested outside jaxtune/job/objectives: {found}"
