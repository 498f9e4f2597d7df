"""Write shakespeare_cloze.jsonl: a 4-way multiple-choice task on the held-out tenth of tiny
Shakespeare (the part `configs/pretrain_shakespeare_char.yaml` never trains on). Each row: the last
40 characters before a cut in a line (`prompt`), the 16 characters that really follow, and the
16-character continuations of three other held-out lines (`choices`, right one at `answer`).
Deterministic (seed 0): python configs/lm_eval/make_shakespeare_cloze.py"""

import json
import random
from pathlib import Path

from jaxtune.data.sources import read_text, resolve_path

HERE = Path(__file__).resolve().parent
CONTEXT, CONTINUATION, ROWS = 40, 16, 200


def main() -> None:
    text = read_text(resolve_path("builtin:tinyshakespeare.txt"))
    held_out = text[int(len(text) * 0.9):]
    rng = random.Random(0)
    cuts = sorted(rng.sample(range(CONTEXT, len(held_out) - CONTINUATION), ROWS * 4))
    rows = []
    for i in range(0, len(cuts), 4):
        true, *others = [held_out[c: c + CONTINUATION] for c in cuts[i: i + 4]]
        choices = [true, *others]
        rng.shuffle(choices)
        rows.append({"prompt": held_out[cuts[i] - CONTEXT: cuts[i]], "choices": choices, "answer": choices.index(true)})
    with open(HERE / "shakespeare_cloze.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
