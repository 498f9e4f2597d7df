"""The evaluations `jaxtune eval` runs on a restored model: generation exact match, log-likelihood
multiple choice and classification metrics (the held-out loss is the training loop's `evaluate`).

Each takes records ``[(record, where)]`` and returns a flat dict of metrics plus a few
``samples`` (prompt, prediction, reference) for the JSON report. Few-shot prompts draw
``shots`` solved examples per evaluated example from a pool with ``np.random.default_rng([seed,
index])``, never the example itself, so a run is reproducible and independent of batch size.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from jaxtune.data.instruct import InstructConfig, generation_prompt
from jaxtune.data.segments import encode_completions
from jaxtune.data.sources import BadRow
from jaxtune.eval.config import EvalTaskConfig
from jaxtune.generate import generate, left_pad
from jaxtune.generate.sampling import SamplingConfig
from jaxtune.generate.text import cut_at_stops, encode_prompt, extract_answer, stop_tokens_of
from jaxtune.models import Model
from jaxtune.models.scoring import continuation_rows, sequence_logprobs

Records = Sequence[tuple[dict, str]]
LENGTH_BUCKET = 16  # prompt / row lengths are rounded up to a multiple of this (fewer compilations)


def draw_shots(pool: Records, k: int, seed: int, index: int, query_where: str) -> list[tuple[dict, str]]:
    """``k`` distinct records of ``pool`` for example ``index`` (never the record at ``query_where``)."""
    if k == 0:
        return []
    candidates = [i for i, (_, where) in enumerate(pool) if where != query_where]
    if len(candidates) < k:
        raise ValueError(f"{k}-shot prompting needs {k} examples besides the query; the shot pool has {len(candidates)}")
    picked = np.random.default_rng([seed, index]).choice(len(candidates), size=k, replace=False)
    return [pool[candidates[int(i)]] for i in picked]


def _bucket(n: int) -> int:
    return -(-n // LENGTH_BUCKET) * LENGTH_BUCKET


def exact_match(task: EvalTaskConfig, model: Model, params, tokenizer, records: Records, pool: Records,
                sft: InstructConfig, *, add_bos: bool = False) -> dict:
    """Greedy generation per prompt, scored by exact match of the extracted answers."""
    prompts, references = [], []
    pattern, numeric = task.answer
    for i, (record, where) in enumerate(records):
        shots = draw_shots(pool, task.shots, task.seed, i, where)
        prompt, reference = generation_prompt(record, where, sft, tokenizer, shots=shots)
        answer = extract_answer(reference, pattern, numeric)
        if answer is None:
            what = f"answer_pattern {task.answer_pattern!r}" + (" as a number" if numeric else "")
            raise ValueError(f"eval task {task.label}: {where}: the reference answer {reference[-80:]!r} has no answer "
                             f"matching {what} (answer_pattern: null compares the whole text; gsm8k takes the number "
                             "after '####'; or a regex whose group 1 is the answer)")
        prompts.append(prompt)
        references.append((reference, answer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (model.cfg.pad_token_id or 0)
    sampling = SamplingConfig(max_new_tokens=task.max_new_tokens, greedy=True,
                              stop_tokens=stop_tokens_of(tokenizer, model.cfg), pad_token_id=int(pad))
    encoded = [encode_prompt(tokenizer, p, add_bos) for p in prompts]
    hits, lengths, samples = 0, [], []
    for start in range(0, len(encoded), task.batch_size):
        chunk = encoded[start: start + task.batch_size]
        rows = chunk + [chunk[0]] * (task.batch_size - len(chunk))  # a fixed batch shape: one compilation
        tokens, mask = left_pad(rows, sampling.pad_token_id, length=_bucket(max(len(r) for r in rows)))
        out = jax.device_get(generate(model, params, tokens, mask, jax.random.key(0), sampling))
        for j in range(len(chunk)):
            i = start + j
            new = [int(t) for t in out.tokens[j, : out.lengths[j]] if int(t) not in sampling.stop_tokens]
            text = cut_at_stops(tokenizer.decode(new), task.stop)
            predicted = extract_answer(text, pattern, numeric)
            reference, answer = references[i]
            hit = predicted is not None and (abs(predicted - answer) < 1e-6 if numeric else predicted == answer)
            hits += hit
            lengths.append(int(out.lengths[j]))
            if len(samples) < task.samples:
                samples.append({"where": records[i][1], "prompt": prompts[i][-400:], "prediction": text,
                                "predicted": predicted, "reference": answer, "correct": bool(hit)})
    return {"exact_match": hits / len(records), "correct": hits, "examples": len(records), "shots": task.shots,
            "mean_new_tokens": float(np.mean(lengths)), "samples": samples}


def choice_parts(record: dict, where: str, task: EvalTaskConfig, sft: InstructConfig) -> tuple[str, list[str], int]:
    """-> (context text, continuation texts, index of the right one) of a multiple-choice record."""
    choices = record.get(task.choices_field)
    if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise BadRow(where, "bad_choices", f"field {task.choices_field!r} must be a list of >= 2 non-empty strings")
    answer = record.get(task.answer_field)
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise BadRow(where, "bad_label", f"field {task.answer_field!r} must index the {len(choices)} choices, got {answer!r}")
    prompt = sft.prompt_format.format(prompt=record.get(sft.columns.prompt)) if sft.columns.prompt in record else None
    if prompt is None:
        raise BadRow(where, "missing_field", f"no field {sft.columns.prompt!r} (the question)")
    return prompt, [sft.completion_format.format(completion=c) for c in choices], answer


def multiple_choice(task: EvalTaskConfig, model: Model, params, tokenizer, records: Records, pool: Records,
                    sft: InstructConfig, *, add_bos: bool = False) -> dict:
    """acc: the continuation with the highest summed log-prob; acc_norm: per UTF-8 byte of the continuation."""
    pairs, owners, items = [], [], []
    for i, (record, where) in enumerate(records):
        context, choices, answer = choice_parts(record, where, task, sft)
        shots = []
        for r, w in draw_shots(pool, task.shots, task.seed, i, where):
            shot_context, shot_choices, shot_answer = choice_parts(r, w, task, sft)
            shots.append(shot_context + shot_choices[shot_answer])
        # each context + choice tokenized once, as its training data was (jaxtune.data.segments)
        ((context_ids, choice_ids),) = encode_completions(tokenizer, [("\n\n".join(shots + [context]), choices)])
        bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
        for ids in choice_ids:
            pairs.append((bos + context_ids, ids))
            owners.append(i)
        items.append((len(choices), answer, [len(c.encode("utf-8")) for c in choices]))
    scores = np.zeros(len(pairs))
    pad = int(model.cfg.pad_token_id or 0)
    for start in range(0, len(pairs), task.batch_size):
        chunk = pairs[start: start + task.batch_size]
        rows = chunk + [chunk[0]] * (task.batch_size - len(chunk))
        batch = continuation_rows(rows, _bucket(max(len(a) + len(b) - 1 for a, b in rows)), pad)
        summed, _ = jax.device_get(sequence_logprobs(model, params, batch))
        scores[start: start + len(chunk)] = summed[: len(chunk)]
    acc = acc_norm = 0
    offset = 0
    for n, answer, sizes in items:
        s = scores[offset: offset + n]
        acc += int(np.argmax(s) == answer)
        acc_norm += int(np.argmax(s / np.asarray(sizes)) == answer)
        offset += n
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "examples": len(items), "shots": task.shots}



def response_scores(task: EvalTaskConfig, score, records: Records, preference) -> dict:
    """Eval task ``score``: a reward model's scores (``score(prompts, responses) -> [n]``) of single
    responses (``task.response_field``: mean, std), or of ``preference.chosen`` / ``rejected`` pairs
    (pairwise accuracy, mean margin)."""
    pc = preference
    prompt_of = lambda r: pc.prompt_format.format(prompt=r.get(pc.prompt, ""))  # noqa: E731
    if all(pc.chosen in r and pc.rejected in r for r, _ in records):
        prompts = [prompt_of(r) for r, _ in records]
        chosen = score(prompts, [r[pc.chosen] for r, _ in records])
        rejected = score(prompts, [r[pc.rejected] for r, _ in records])
        return {"pairs": len(records), "accuracy": float(np.mean(chosen > rejected)),
                "margin": float(np.mean(chosen - rejected)), "chosen_mean": float(np.mean(chosen)),
                "rejected_mean": float(np.mean(rejected))}
    missing = [w for r, w in records if task.response_field not in r]
    if missing:
        raise ValueError(f"{missing[0]}: no field {task.response_field!r} (eval task score: responses, or "
                         f"{pc.chosen!r} / {pc.rejected!r} pairs)")
    scores = score([prompt_of(r) for r, _ in records], [r[task.response_field] for r, _ in records])
    return {"responses": len(records), "mean": float(np.mean(scores)), "std": float(np.std(scores)),
            "samples": [{"where": w, "score": float(s)} for (_, w), s in zip(records[: task.samples], scores)]}
