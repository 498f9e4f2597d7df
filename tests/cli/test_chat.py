"""Chat mode end to end on a tiny random Qwen2 with a character tokenizer and a ChatML template:
``jaxtune chat`` turn by turn against decoding each whole conversation from scratch (``generate
messages=``) and transformers' greedy ``generate``; ``messages=`` against hand-written ChatML."""

import io
import json
import sys

import pytest

from jaxtune.cli.main import main
from jaxtune.data import load_tokenizer
from jaxtune.generate.chat import render_ids
from tests.data.tokenizer_kinds import CHATML
from tests.reference import require

torch = require("torch")
transformers = require("transformers")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz .,!?\n")
SYSTEM = "be brief."
USERS = ["hello there!", "what is two and two?", "count down from twelve."]
FIRST = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USERS[0]}]
GREEDY = ["sampling.greedy=true", "sampling.max_new_tokens=8"]


def chatml(messages):
    """The conversation written by hand, as a user would: ChatML with the assistant's header last."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def save_tokenizer(directory, chat_template):
    """One token per character (any id sequence decodes and re-encodes to itself) and ChatML's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + CHARS)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                              pad_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    hf.chat_template = chat_template
    hf.save_pretrained(directory)
    return hf


def greedy_reference(model, ids, steps):
    """transformers' greedy continuation of ``ids`` (no stop token)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=steps, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    """(model directory, tokenizer override, tokenizer, transformers' greedy first reply), built once
    per session. Specials other than <|im_end|> get zero output rows (never the argmax); <|im_end|>
    takes over the row of a token the first reply would emit (its first new one after two), so it
    ends that reply there. The tokenizer has a directory of its own: beside a Qwen2 config.json,
    transformers 5's AutoTokenizer would load it as a byte-level Qwen2Tokenizer, dropping spaces."""
    from tests.conftest import shared_directory

    root = shared_directory(tmp_path_factory, "chat_qwen2", build_chat_model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "tokenizer")
    reference = json.loads((root / "reference.json").read_text())
    return root / "model", f"tokenizer.path={root / 'tokenizer'}", tokenizer, reference


def build_chat_model(root):
    """Save the model, the tokenizer and transformers' greedy reply to the first turn under ``root``."""
    hf = save_tokenizer(root / "tokenizer", CHATML)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=len(hf), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    head = model.lm_head.weight
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
        head[: len(SPECIALS)] = 0
    ids = hf.apply_chat_template(FIRST, add_generation_prompt=True, return_dict=False)
    free = greedy_reference(model, ids, 8)
    k = next(i for i in range(2, 8) if free[i] not in free[:i])
    end = hf.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        head[end], head[free[k]] = head[free[k]].clone(), 0
    model.save_pretrained(root / "model")
    reply = greedy_reference(model, ids, 8)
    assert reply[: k + 1] == free[:k] + [end]  # the swap ends the reply at step k, as intended
    (root / "reference.json").write_text(json.dumps(reply[: k + 1]))


def json_lines(text):
    """Every line of ``text`` parsed as JSON (fails on anything else)."""
    return [json.loads(line) for line in text.splitlines()]


def test_chat_turns_equal_decoding_each_conversation_from_scratch(chat_model, monkeypatch, capsys):
    directory, tokenizer, hf, reference = chat_model
    stdin = "\n".join(USERS + ["/reset", USERS[0], "/exit", "not read"]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(["chat", str(directory), tokenizer, *GREEDY, "--system", SYSTEM, "--json"]) == 0
    out, err = capsys.readouterr()
    replies = json_lines(out)
    assert len(replies) == 4 and "4 replies" in err and "re-prefilling" not in err
    assert replies[0]["tokens"] == reference and replies[0]["stopped"]  # transformers' reply, ended by <|im_end|>
    assert replies[3]["tokens"] == reference and replies[3]["reused"] == 0  # /reset: a new conversation
    conversations, history, cached = [], FIRST[:1], 0
    for user, reply in zip(USERS, replies):
        conversation = history + [{"role": "user", "content": user}]
        ids = hf.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False)
        # the cache held the previous prompt and reply: only the rest of this rendering is run
        assert (reply["reused"], reply["prefilled"]) == (cached, len(ids) - cached)
        cached = len(ids) + len(reply["tokens"])
        conversations.append(conversation)
        history = conversation + [{"role": "assistant", "content": reply["reply"]}]
    assert replies[1]["reused"] > 0 and replies[2]["reused"] > replies[1]["reused"]
    # generate messages= (a batch of conversations, each decoded from scratch) gives the same replies
    assert main(["generate", f"model.hf_dir={directory}", tokenizer, f"messages={json.dumps(conversations)}", *GREEDY,
                 "--json"]) == 0
    out, err = capsys.readouterr()
    scratch = json_lines(out)
    assert "tokens in" in err and [r["tokens"] for r in scratch] == [r["tokens"] for r in replies[:3]]
    assert scratch[0]["prompt"] == chatml(FIRST) and scratch[0]["messages"] == FIRST
    assert scratch[0]["completion"] == hf.decode(reference[:-1])


def test_generate_hand_written_chatml_gives_the_same_tokens(chat_model, capsys):
    """``prompts=[ChatML text]`` decodes the very ids ``messages=`` renders (transformers' own), so the
    same greedy reply; without chat mode <|im_end|> is no stop token and the text goes on."""
    directory, tokenizer, hf, reference = chat_model
    ids = hf.apply_chat_template(FIRST, add_generation_prompt=True, return_dict=False)
    assert ids == hf.encode(chatml(FIRST), add_special_tokens=False)
    assert render_ids(load_tokenizer(tokenizer.split("=", 1)[1]), FIRST) == ids
    assert main(["generate", f"model.hf_dir={directory}", tokenizer, f"prompts={json.dumps([chatml(FIRST)])}", *GREEDY,
                 "--json"]) == 0
    out, err = capsys.readouterr()
    [plain] = json_lines(out)
    assert "tokens in" in err and plain["tokens"][: len(reference)] == reference and len(plain["tokens"]) == 8


def test_chat_mode_errors(chat_model, tmp_path, monkeypatch, capsys):
    directory, tokenizer, _, _ = chat_model
    save_tokenizer(tmp_path, None)
    one = json.dumps([{"role": "user", "content": "hi"}])
    assert main(["generate", f"model.hf_dir={directory}", f"tokenizer.path={tmp_path}", f"messages={one}"]) == 1
    assert "has no chat template" in capsys.readouterr().err
    assert main(["generate", f"model.hf_dir={directory}", f"messages={one}", "prompts=[hi]"]) == 1
    assert "prompts or messages, not both" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", str(directory), "sampling.slide=true"]) == 1
    assert "sampling.slide is not supported in chat" in capsys.readouterr().err
    # a message that does not fit even a fresh conversation is said so, not truncated
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there!\n"))
    assert main(["chat", str(directory), tokenizer, *GREEDY, "--max-len", "20"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "message not answered" in err and "0 replies" in err
