"""Run metadata: what a run writes beside its checkpoints, when a directory may be resumed, atomic writes."""

import json
import os
import threading

from etils import epath
import pytest

from jaxtune.config import from_dict, to_dict
from jaxtune.job import TrainJobConfig
from jaxtune.job.runmeta import (
    MODEL_CONFIG_FILE,
    TRAIN_META_FILE,
    read_model_config,
    read_train_meta,
    recorded_head,
    recorded_peft,
    replace_text,
    run_meta,
    start_run,
)
from jaxtune.models.heads import SCORE, VALUE_MODEL, HeadSpec
from jaxtune.models.presets import preset

CFG = preset("tiny-llama")
LORA = {"lora": {"rank": 4, "targets": ["attention"]}}


def _job(**sections):
    return from_dict(TrainJobConfig, {"model": {"preset": "tiny-llama"}, **sections})


def _steps(directory, *steps):
    for s in steps:
        (directory / str(s)).mkdir(parents=True)


def test_a_run_records_its_model_job_and_head(tmp_path):
    job = _job(peft=LORA, train={"trainable": ["^lm_head/"]})
    head = HeadSpec(SCORE, outputs=3, pooling="mean")
    start_run(tmp_path, CFG, run_meta(job, head))
    assert read_model_config(tmp_path) == CFG
    meta = read_train_meta(tmp_path)
    assert meta["job"] == to_dict(job) and meta["base"] == to_dict(job.model)
    assert meta["trainable"] == ["^lm_head/"] and meta["peft"]["lora"]["rank"] == 4
    assert meta["head"] == {"kind": "causal", "num_labels": 3, "pooling": "mean", "key": SCORE}
    assert recorded_head(meta, tmp_path) == head
    assert recorded_peft(meta, tmp_path).lora.rank == 4
    value = HeadSpec(VALUE_MODEL, model_config=CFG.replace(num_layers=1))
    assert recorded_head(run_meta(job, value), tmp_path) == value  # a value network's architecture too


def test_resuming_needs_the_same_model_and_split(tmp_path):
    job = _job(peft=LORA)
    start_run(tmp_path, CFG, run_meta(job, None))
    _steps(tmp_path, 10)
    with pytest.warns(UserWarning, match="differs from the saved config in dtype, remat"):  # numerics may change
        start_run(tmp_path, CFG.replace(dtype="bfloat16", remat="full"), run_meta(job, None))
    with pytest.raises(ValueError, match=f"holds a run of another model .*num_layers: {CFG.num_layers} -> 3"):
        start_run(tmp_path, CFG.replace(num_layers=3), run_meta(job, None))
    # a refusal names the keys that differ, not two whole sections
    with pytest.raises(ValueError, match=r"other peft settings \(peft.lora.rank: 4 -> 8\);") as err:
        start_run(tmp_path, CFG, run_meta(_job(peft={"lora": {"rank": 8}}), None))
    assert "alpha" not in str(err.value)
    with pytest.raises(ValueError, match=r"other head settings \(.*head.num_labels: None -> 2"):
        start_run(tmp_path, CFG, run_meta(job, HeadSpec(SCORE, outputs=2)))
    assert read_train_meta(tmp_path)["peft"]["lora"]["rank"] == 4  # a refused run wrote nothing


def test_a_directory_without_steps_is_a_new_run(tmp_path):
    start_run(tmp_path, CFG, run_meta(_job(), None))
    with pytest.warns(UserWarning, match="differs from the saved config in num_layers; rewriting"):
        start_run(tmp_path, CFG.replace(num_layers=3), run_meta(_job(peft=LORA), None))
    assert json.loads((tmp_path / MODEL_CONFIG_FILE).read_text())["num_layers"] == 3


def test_run_files_are_replaced_whole_while_other_processes_read(tmp_path):
    """On resume, process 0 rewrites model_config.json / train_meta.json while the other processes
    read them (each checks the run is resumable): a reader must never see a half-written file."""
    path = epath.Path(tmp_path) / TRAIN_META_FILE
    texts = [json.dumps({"run": i, "pad": "x" * 20000}) + "\n" for i in range(2)]
    replace_text(path, texts[0])
    stop, seen, bad = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            try:
                seen.add(json.loads(path.read_text())["run"])
            except json.JSONDecodeError as err:
                bad.append(err)

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(400):
        replace_text(path, texts[i % 2])
    stop.set()
    thread.join()
    assert not bad, f"a reader saw a partial file {len(bad)} times"
    assert seen == {0, 1}
    assert [p.name for p in epath.Path(tmp_path).iterdir()] == [TRAIN_META_FILE]  # no temporary left

    mtime = os.stat(path).st_mtime_ns
    replace_text(path, texts[1])  # the same text: the file is not touched
    assert os.stat(path).st_mtime_ns == mtime
