"""lm-evaluation-harness with ``--model jaxtune``: on local task YAMLs over local JSONL files (no hub),
a jaxtune params checkpoint and the same weights exported with ``jaxtune convert orbax-to-hf`` and run
by lm-eval's own ``hf`` backend give the same log-likelihoods (multiple choice, rolling), the same
greedy ``generate_until`` outputs and the same accuracies; the accuracy equals ``jaxtune eval``'s
multiple-choice task on the same rows; the ``jaxtune lm-eval`` command runs lm-eval's CLI."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxtune.cli.main import main
from jaxtune.job.assemble import save_model
from jaxtune.models import Model, ModelConfig
from tests.data import tokenizer_kinds as K

lm_eval = pytest.importorskip("lm_eval")  # the test extra installs it; the eval extra for users
from lm_eval.tasks import TaskManager  # noqa: E402

from jaxtune.job.harness import JaxtuneLM  # noqa: E402

QUESTIONS = [("What is two and two?", ["four", "five", "ten"], 0), ("Count down from twelve:", ["Twelve", "one"], 0),
             ("Be brief. Hello", ["there!", "no.", "yes"], 1), ("The answer is", [" twelve.", " four.", " yes."], 2)]
TEXTS = ["Hello there, be brief. What is two and two? It is four. " * 18,  # several 96-token windows
         "Twelve, eleven, ten.", "yes no"]


def _tasks(root):
    choice = root / "choice.jsonl"
    choice.write_text("".join(json.dumps({"prompt": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "jt_choice.yaml").write_text(
        f"task: jt_choice\n{common}dataset_kwargs:\n  data_files:\n    test: {choice}\noutput_type: multiple_choice\n"
        "doc_to_text: '{{prompt}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (root / "jt_rolling.yaml").write_text(
        f"task: jt_rolling\n{common}dataset_kwargs:\n  data_files:\n    test: {text}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (root / "jt_generate.yaml").write_text(
        f"task: jt_generate\n{common}dataset_kwargs:\n  data_files:\n    test: {choice}\noutput_type: generate_until\n"
        "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{choices[answer]}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random two-block Llama on a byte-level BPE tokenizer: a jaxtune params checkpoint (``orbax``)
    and its ``convert orbax-to-hf`` export (``hf``)."""
    root = tmp_path_factory.mktemp("harness")
    tokenizer_dir = K.build("byte_bpe", root / "tokenizer", chat_template=K.CHATML)
    cfg = ModelConfig(family="llama", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, intermediate_size=128, max_position_embeddings=96, eos_token_id=0)
    params = Model(cfg).init(jax.random.key(3))
    save_model(root / "orbax", params, cfg)
    for f in tokenizer_dir.iterdir():
        (root / "orbax" / f.name).write_bytes(f.read_bytes())
    assert main(["convert", "orbax-to-hf", str(root / "orbax"), str(root / "hf")]) == 0
    return root


def _evaluate(model, tasks_dir, **kw):
    return lm_eval.simple_evaluate(model=model, tasks=["jt_choice", "jt_rolling", "jt_generate"],
                                   task_manager=_task_manager(tasks_dir), log_samples=True, bootstrap_iters=0, **kw)


def _task_manager(tasks_dir):
    """Only the local tasks: indexing lm-eval's thousands of built-in task YAMLs takes seconds every time."""
    return TaskManager(include_path=str(tasks_dir), include_defaults=False)


def _choice_scores(result) -> np.ndarray:
    """The log-likelihood of every choice of every jt_choice row, in order."""
    return np.array([x[0] for s in result["samples"]["jt_choice"] for x in s["filtered_resps"]], float)


def _responses(result, task):
    return [[r for r in sample["filtered_resps"]] for sample in result["samples"][task]]


def test_jaxtune_backend_equals_the_hf_backend_on_the_exported_model(exported, tmp_path, capsys):
    tasks = _tasks(tmp_path)
    ours = _evaluate(JaxtuneLM(checkpoint=str(exported / "orbax"), batch_size=4), tasks)
    hf = _evaluate("hf", tasks, model_args=f"pretrained={exported / 'hf'},dtype=float32,device=cpu", batch_size=4)
    for task in ("jt_choice", "jt_rolling"):
        a, b = _responses(ours, task), _responses(hf, task)
        flat = lambda rs: np.array([x[0] if isinstance(x, (list, tuple)) else x  # noqa: E731
                                    for r in rs for x in r], float)
        np.testing.assert_allclose(flat(a), flat(b), rtol=0, atol=1e-4, err_msg=task)
    assert _responses(ours, "jt_generate") == _responses(hf, "jt_generate")
    assert any(r[0] for r in _responses(ours, "jt_generate"))  # something was generated
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["jt_choice"][metric] == hf["results"]["jt_choice"][metric]
    assert ours["results"]["jt_rolling"]["bits_per_byte,none"] == pytest.approx(
        hf["results"]["jt_rolling"]["bits_per_byte,none"], rel=1e-5)

    # --apply_chat_template: requests rendered with the tokenizer's chat template, as the hf backend does
    chat = [lm_eval.simple_evaluate(model=model, tasks=["jt_choice"], apply_chat_template=True,
                                    task_manager=_task_manager(tasks), log_samples=True,
                                    bootstrap_iters=0, **kw)
            for model, kw in ((JaxtuneLM(checkpoint=str(exported / "orbax"), batch_size=4), {}),
                              ("hf", {"model_args": f"pretrained={exported / 'hf'},dtype=float32,device=cpu",
                                      "batch_size": 4}))]
    assert "<|im_start|>user" in str(chat[0]["samples"]["jt_choice"][0]["arguments"])
    flat = _choice_scores
    np.testing.assert_allclose(flat(chat[0]), flat(chat[1]), rtol=0, atol=1e-4)

    # jaxtune eval's multiple-choice task on the same rows (lm-eval puts a space before each choice)
    capsys.readouterr()
    assert main(["eval", "--json", f"model.checkpoint={exported / 'orbax'}", "data.kind=sft",
                 f"data.sources=[{{path: '{tasks / 'choice.jsonl'}'}}]",
                 f"eval.tasks=[{{kind: choice, name: mc, sources: [{{path: '{tasks / 'choice.jsonl'}'}}], "
                 "sft: {completion_format: ' {completion}'}, batch_size: 4}]"]) == 0
    mc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mc"]
    assert mc["examples"] == len(QUESTIONS)
    assert (mc["acc"], mc["acc_norm"]) == (ours["results"]["jt_choice"]["acc,none"],
                                           ours["results"]["jt_choice"]["acc_norm,none"])


def test_the_lm_eval_command_runs_with_the_jaxtune_backend(exported, tmp_path, capsys):
    tasks = _tasks(tmp_path)
    assert main(["lm-eval", "--model", "jaxtune", "--model_args", f"checkpoint={exported / 'orbax'},batch_size=4",
                 "--tasks", "jt_choice", "--include_path", str(tasks)]) == 0
    out = capsys.readouterr().out
    assert "jt_choice" in out and "acc" in out


def test_a_qlora_run_evaluates_as_its_merged_export_does(exported, tmp_path):
    """A LoRA run over an NF4 base (QLoRA) is restored onto its quantized base by the backend and scores
    as lm-eval's hf backend scores the run exported with --merge-lora (dequantized base + B A)."""
    run = tmp_path / "qlora"
    assert main(["train", f"model.checkpoint={exported / 'orbax'}", "model.preset=null",
                 "model.quant={kind: nf4, blocksize: 32, targets: [all-linear]}",
                 "peft.lora={rank: 4, alpha: 8, targets: [all-linear]}", "optim.lr=3e-2", "optim.warmup_steps=1",
                 "data.kind=synthetic", "train.steps=3", "train.batch_size=4", "train.seq_len=32",
                 "logging.progress=false", "logging.tensorboard=false", f"checkpoint.directory={run}"]) == 0
    assert main(["convert", "orbax-to-hf", str(run), str(tmp_path / "merged"), "--merge-lora"]) == 0
    for f in (exported / "orbax").iterdir():  # the tokenizer beside the merged weights, for the hf backend
        if f.name.startswith(("tokenizer", "special_tokens")):
            (tmp_path / "merged" / f.name).write_bytes(f.read_bytes())
    tasks = _tasks(tmp_path)
    evaluate = lambda model, **kw: lm_eval.simple_evaluate(  # noqa: E731
        model=model, tasks=["jt_choice"], task_manager=_task_manager(tasks), log_samples=True,
        bootstrap_iters=0, **kw)
    with pytest.raises(ValueError, match="no tokenizer here .* pass tokenizer=DIR"):  # synthetic data: none saved
        JaxtuneLM(checkpoint=str(run))
    ours = evaluate(JaxtuneLM(checkpoint=str(run), tokenizer=str(exported / "orbax"), batch_size=4))
    hf = evaluate("hf", model_args=f"pretrained={tmp_path / 'merged'},dtype=float32,device=cpu", batch_size=4)
    flat = _choice_scores
    np.testing.assert_allclose(flat(ours), flat(hf), rtol=0, atol=1e-4)
    # not a trivial agreement: training moved the merged weights away from the base's
    from safetensors.numpy import load_file

    merged, base = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "merged", exported / "hf"))
    assert max(float(np.abs(merged[k] - base[k]).max()) for k in base if k.endswith("proj.weight")) > 1e-3
