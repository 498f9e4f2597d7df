"""The shipped synthetic task files are what `jaxtune.data.tasks` generates (their provenance)."""

import json

from jaxtune.data.sources import resolve_path
from jaxtune.data.tasks import addition, colour_sentences, shout_demonstrations, shout_preferences


def _read(name):
    return [json.loads(line) for line in resolve_path(f"builtin:{name}").read_text().splitlines()]


def test_builtin_task_files_equal_their_generator():
    assert _read("addition_train.jsonl") == addition(3000, 0)
    assert _read("addition_eval.jsonl") == addition(128, 1)
    assert _read("colours_train.jsonl") == colour_sentences(600, 0)
    assert _read("colours_eval.jsonl") == colour_sentences(120, 1)
    assert _read("shout_train.jsonl") == shout_preferences(400, 0)
    assert _read("shout_eval.jsonl") == shout_preferences(64, 1)
    assert _read("shout_sft.jsonl") == shout_demonstrations(400, 0)


def test_shout_demonstrations_answer_with_one_side_of_each_pair():
    pairs, demos = shout_preferences(200, 4), shout_demonstrations(200, 4, shout_rate=0.3)
    shouted = [d["completion"] == p["chosen"] for p, d in zip(pairs, demos)]
    assert all(d["prompt"] == p["prompt"] and d["completion"] in (p["chosen"], p["rejected"]) for p, d in zip(pairs, demos))
    assert 0.2 < sum(shouted) / len(shouted) < 0.4


def test_addition_answers_are_the_sums():
    for record in addition(50, 3):
        a, b = record["prompt"].rstrip("=").split("+")
        assert int(record["completion"]) == int(a) + int(b) and int(a) < 100 and int(b) < 10
    chat = addition(5, 3, chat=True)
    assert [m["role"] for m in chat[0]["messages"]] == ["user", "assistant"]
    assert chat[0]["messages"][1]["content"] == addition(5, 3)[0]["completion"]
