"""SFT data: formats, completion-only / assistant-only loss masks, chat templates (checked against
transformers' own assistant masks), over-long and bad rows, packing, stream state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxtune.data.instruct import InstructConfig, generation_prompt, render
from jaxtune.data.sft import ExampleStream, load_examples
from jaxtune.data.sources import SourceConfig, build_source
from jaxtune.data.tokenizer import ByteTokenizer, load_tokenizer

BYTE = ByteTokenizer()
GSM8K = "builtin:gsm8k_train_slice.jsonl"


def _jsonl(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build_source(SourceConfig(path=str(path)))


def _trained_text(example, tokenizer=BYTE):
    """The tokens that are targets, decoded (EOS shown as <eos>)."""
    out = []
    for token, trained in zip(example.tokens, example.trained):
        if trained:
            out.append("<eos>" if token == tokenizer.eos_token_id else tokenizer.decode([token]))
    return "".join(out)


def _cfg(**kw):
    from jaxtune.config import from_dict

    return from_dict(InstructConfig, kw)


def test_prompt_completion_trains_only_the_completion_and_eos(tmp_path):
    source = _jsonl(tmp_path, [{"q": "2+2?", "a": "4"}, {"q": "Say hi", "a": "hi there"}])
    cfg = _cfg(columns={"prompt": "q", "completion": "a"}, prompt_format="Q: {prompt}\nA: ")
    examples = load_examples([source], cfg, BYTE, seq_len=64).examples
    assert [BYTE.decode(e.tokens) for e in examples] == ["Q: 2+2?\nA: 4", "Q: Say hi\nA: hi there"]
    assert [_trained_text(e) for e in examples] == ["4<eos>", "hi there<eos>"]
    everything = load_examples([source], _cfg(columns={"prompt": "q", "completion": "a"}, loss="all"), BYTE, seq_len=64)
    assert everything.examples[0].trained.all()


def test_gsm8k_slice_renders_with_the_answer_as_the_only_target():
    GSM8K_SFT = _cfg(columns={"prompt": "question", "completion": "answer"}, prompt_format="Question: {prompt}\nAnswer: ")
    examples = load_examples([build_source(SourceConfig(path=GSM8K))], GSM8K_SFT, BYTE, seq_len=2048).examples
    assert len(examples) == 256
    first = json.loads(open(build_source(SourceConfig(path=GSM8K)).path).readline())
    assert BYTE.decode(examples[0].tokens).startswith("Question: " + first["question"] + "\nAnswer: ")
    assert _trained_text(examples[0]) == first["answer"] + "<eos>"


def test_alpaca_prompt_with_and_without_input(tmp_path):
    source = _jsonl(tmp_path, [{"instruction": "Add.", "input": "2 and 3", "output": "5"},
                               {"instruction": "Greet.", "input": "", "output": "Hello"}])
    a, b = load_examples([source], InstructConfig(), BYTE, seq_len=512).examples
    text_a, text_b = BYTE.decode(a.tokens), BYTE.decode(b.tokens)
    assert "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n5" in text_a
    assert "paired with an input" in text_a and "paired with an input" not in text_b
    assert "### Input" not in text_b and text_b.endswith("### Response:\nHello")
    assert [_trained_text(a), _trained_text(b)] == ["5<eos>", "Hello<eos>"]


CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}]}


def test_builtin_chatml_multi_turn_trains_assistant_turns_only(tmp_path):
    (example,) = load_examples([_jsonl(tmp_path, [CHAT])], InstructConfig(), BYTE, seq_len=512).examples
    assert BYTE.decode(example.tokens) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n")
    assert _trained_text(example) == "Hello!<|im_end|><eos>4<|im_end|><eos>"


GENERATION_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|start|>assistant\n{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}\n"
    "{% else %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory):
    """A small BPE tokenizer with special tokens and a chat template with {% generation %} tags."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("chat_tokenizer")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<pad>", "<eos>", "<|start|>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Hello there, be brief. What is 2+2? It is 4.", "user assistant system"] * 50, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = GENERATION_TEMPLATE
    fast.save_pretrained(directory)
    return directory


def test_tokenizer_chat_template_masks_equal_transformers_assistant_masks(tmp_path, chat_tokenizer_dir):
    tokenizer = load_tokenizer(chat_tokenizer_dir)
    (example,) = load_examples([_jsonl(tmp_path, [CHAT])], InstructConfig(), tokenizer, seq_len=512).examples
    reference = tokenizer.tokenizer.apply_chat_template(CHAT["messages"], tokenize=True, return_dict=True,
                                                        return_assistant_tokens_mask=True)
    np.testing.assert_array_equal(example.tokens, reference["input_ids"])
    np.testing.assert_array_equal(example.trained.astype(int), reference["assistant_masks"])
    assert example.trained.sum() > 0


def test_template_rewriting_earlier_turns_is_reported(tmp_path, chat_tokenizer_dir):
    tokenizer = load_tokenizer(chat_tokenizer_dir)
    # drops all but the last assistant turn (as reasoning templates do): prefixes do not extend
    tokenizer.tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}<|start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")
    with pytest.raises(ValueError, match=r"data\.jsonl:1: .*renders earlier turns differently"):
        load_examples([_jsonl(tmp_path, [CHAT])], InstructConfig(), tokenizer, seq_len=512)


def test_over_long_examples_are_truncated_dropped_or_refused_with_counts(tmp_path):
    rows = [{"prompt": "p", "completion": "x" * 40}, {"prompt": "p", "completion": "short"},
            {"prompt": "y" * 40, "completion": "z"}]
    source = _jsonl(tmp_path, rows)
    truncated = load_examples([source], InstructConfig(), BYTE, seq_len=20)
    assert dict(truncated.counts) == {"truncated": 2, "no_target": 1}  # the third keeps only prompt tokens
    assert [len(e.tokens) for e in truncated.examples] == [21, 7]
    dropped = load_examples([source], _cfg(on_long="drop"), BYTE, seq_len=20)
    assert dict(dropped.counts) == {"dropped_long": 2} and len(dropped.examples) == 1
    with pytest.raises(ValueError, match=r"data\.jsonl:1: 42 tokens, longer than train\.seq_len \+ 1 = 21"):
        load_examples([source], _cfg(on_long="error"), BYTE, seq_len=20)


def test_bad_rows_name_the_row_or_are_counted(tmp_path):
    source = _jsonl(tmp_path, [{"prompt": "a", "completion": "b"}, {"prompt": "a"}, {"prompt": "a", "completion": "  "}])
    with pytest.raises(ValueError, match=r"data\.jsonl:2: cannot tell the instruction format"):
        load_examples([source], InstructConfig(), BYTE, seq_len=32)
    skipped = load_examples([source], InstructConfig(), BYTE, seq_len=32, on_bad_row="skip")
    assert dict(skipped.counts) == {"missing_field": 1, "empty": 1} and len(skipped.examples) == 1
    with pytest.raises(ValueError, match=r"data\.jsonl:1: no field 'messages'"):
        load_examples([source], _cfg(format="messages"), BYTE, seq_len=32)


def _stream_examples(tmp_path, n=10):
    rows = [{"prompt": f"q{i}:", "completion": "a" * (1 + i % 4)} for i in range(n)]
    return load_examples([_jsonl(tmp_path, rows)], InstructConfig(), BYTE, seq_len=16)


def test_packed_rows_hold_whole_examples_with_their_own_segments_and_positions(tmp_path):
    examples = _stream_examples(tmp_path, n=40)
    batch = next(ExampleStream(examples, 4, 16, shuffle=False))
    seen = 0
    for row in range(4):
        seg = batch["segment_ids"][row]
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            example = examples.examples[seen]
            n = len(example.tokens) - 1
            assert len(where) == n and where[0] + n - 1 == where[-1]  # contiguous, whole
            np.testing.assert_array_equal(batch["positions"][row, where], np.arange(n))
            np.testing.assert_array_equal(batch["tokens"][row, where], example.tokens[:-1])
            np.testing.assert_array_equal(batch["loss_mask"][row, where], example.trained[1:])
            seen += 1
    assert seen > 4  # several examples per row
    padded = next(ExampleStream(examples, 4, 16, shuffle=False, packing="pad"))
    assert padded["segment_ids"].max() == 1


def test_stream_state_resumes_exactly_and_a_finite_pass_sees_every_example_once(tmp_path):
    examples = _stream_examples(tmp_path)
    a = ExampleStream(examples, 2, 16, seed=3)
    for _ in range(3):
        next(a)
    b = ExampleStream(examples, 2, 16, seed=3)
    b.set_state(a.get_state())
    for _ in range(4):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    one_pass = ExampleStream(examples, 2, 16, shuffle=False, epochs=1)
    segments = sum(int(len(np.unique(b["segment_ids"][r])) - (0 in b["segment_ids"][r])) for b in one_pass for r in range(2))
    assert segments == len(examples.examples)
    with pytest.raises(ValueError, match="does not match this stream"):
        b.set_state({**a.get_state(), "examples": 3})


def test_few_shot_prompts_are_reproducible_and_never_contain_the_query(tmp_path):
    from jaxtune.eval.tasks import draw_shots

    pool = [({"prompt": f"Q{i}? ", "completion": f"A{i}"}, f"pool:{i}") for i in range(6)]
    query = pool[2]
    shots = draw_shots(pool, 3, seed=7, index=0, query_where=query[1])
    assert shots == draw_shots(pool, 3, seed=7, index=0, query_where=query[1])
    assert len({w for _, w in shots}) == 3 and query[1] not in {w for _, w in shots}
    assert shots != draw_shots(pool, 3, seed=8, index=0, query_where=query[1])
    prompt, reference = generation_prompt(query[0], query[1], InstructConfig(), BYTE, shots=shots)
    blocks = prompt.split("\n\n")
    assert blocks[-1] == "Q2? " and reference == "A2"
    assert blocks[:-1] == [r["prompt"] + r["completion"] for r, _ in shots]
    chat, _ = generation_prompt(query[0], query[1], _cfg(template="chatml"), BYTE, shots=shots[:1])
    first = shots[0][0]
    assert chat == (f"<|im_start|>user\n{first['prompt']}<|im_end|>\n<|im_start|>assistant\n{first['completion']}<|im_end|>\n"
                    "<|im_start|>user\nQ2? <|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="needs 6 examples besides the query"):
        draw_shots(pool, 6, seed=0, index=0, query_where=query[1])


def test_generation_prompt_matches_the_training_rendering_prefix(tmp_path, chat_tokenizer_dir):
    tokenizer = load_tokenizer(chat_tokenizer_dir)
    record = {"prompt": "What is 2+2?", "completion": "4"}
    cfg = _cfg(template="tokenizer")
    prompt, reference = generation_prompt(record, "r", cfg, tokenizer)
    segments = render(record, "r", cfg, tokenizer, eos=None)
    trained_at = next(i for i, s in enumerate(segments) if s.trained)
    assert "".join(s.text for s in segments[:trained_at]) == prompt and reference == "4"
