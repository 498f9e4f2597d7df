import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "JAXTUNE_TEST_NO_COMPILE_CACHE" not in os.environ:
    # One persistent compilation cache per test session (subprocess tests inherit it): many tests
    # compile the same small train steps, and a cache hit skips XLA's compile.
    import atexit
    import shutil
    import tempfile

    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        _cache = tempfile.mkdtemp(prefix="jaxtune-test-xla-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
        atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# Most of the suite's time is XLA:CPU compiling small programs that then run a few steps: LLVM's
# optimisation passes cost ~30% of the CPU time (tests/train/test_step.py + tests/quant/test_qlora.py:
# 111 s -> 79 s) and buy nothing at these sizes. Subprocess tests inherit it; those that set their own
# XLA_FLAGS (device counts) add SUITE_XLA_FLAGS.
SUITE_XLA_FLAGS = "" if "JAXTUNE_TEST_OPTIMIZED_XLA" in os.environ else "--xla_backend_optimization_level=0"
if SUITE_XLA_FLAGS and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + SUITE_XLA_FLAGS).strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(name) -> (directory, torch model); built once per session."""
    from tests.hf_reference import save_model

    cache = {}

    def get(name):
        if name not in cache:
            directory = tmp_path_factory.mktemp(f"hf_{name}")
            cache[name] = (directory, save_model(name, directory))
        return cache[name]

    return get


def shared_directory(tmp_path_factory, name: str, build):
    """``build(directory)`` once per test session, whatever the number of xdist workers: the first
    worker to ask builds it (under a file lock) in the session's shared temporary root, the others
    wait and reuse it. Without xdist it is an ordinary per-session directory."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-of-<user>/pytest-<n>: this session's, shared by its workers
    directory, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            build(directory)
            done.touch()
    return directory


# tiny-llama with two blocks (of its four) at half its width: its byte vocabulary, bos / eos / pad ids and GQA,
# and still more than one block. For tests of the loop, data, checkpoints, signals, processes or restoring
# rather than of the model: it compiles in about half the time. A ModelConfig (jaxtune.config.from_dict), a
# job's model.config, or as `jaxtune` command-line overrides (TWO_BLOCKS_ARGS).
TWO_BLOCKS = {"vocab_size": 259, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
             "intermediate_size": 128, "max_position_embeddings": 1024, "bos_token_id": 257, "eos_token_id": [258],
             "pad_token_id": 256}
TWO_BLOCKS_ARGS = ["model.preset=null", f"model.config={json.dumps(TWO_BLOCKS)}"]

FINE_TUNE_COMMON = {"tokenizer": {"kind": "byte"},
                    "optim": {"lr": 3e-3, "warmup_steps": 5, "schedule": "constant"},
                    "logging": {"progress": False, "tensorboard": False, "jsonl": False}}


@pytest.fixture(scope="session")
def shakespeare_base(tmp_path_factory):
    """A tiny Llama pretrained for 60 steps on tiny Shakespeare (byte tokenizer): the base that
    fine-tuning tests adapt to a style it never saw. -> its run directory."""
    from jaxtune.config import from_dict
    from jaxtune.job import TrainJobConfig, run_training

    def build(directory):
        run_training(from_dict(TrainJobConfig, {**FINE_TUNE_COMMON, "model": {"preset": "tiny-llama"},
                     "data": {"kind": "text", "path": "builtin:tinyshakespeare.txt"},
                     "train": {"steps": 60, "batch_size": 8, "seq_len": 64, "eval_batches": 0},
                     "checkpoint": {"directory": str(directory)}}))

    return shared_directory(tmp_path_factory, "shakespeare_base", build)


@pytest.fixture(scope="session")
def arithmetic_style(tmp_path_factory):
    """data: section of a text style the Shakespeare base never saw ("12 plus 30 is 42.")."""
    import numpy as np

    directory = tmp_path_factory.mktemp("arithmetic")

    def write(path, lines, seed):
        rng = np.random.default_rng(seed)
        a, b = rng.integers(0, 100, (2, lines))
        path.write_text("".join(f"{x} plus {y} is {x + y}.\n" for x, y in zip(a, b)))
        return str(path)

    return {"kind": "text", "path": write(directory / "train.txt", 3000, 0), "eval_path": write(directory / "eval.txt", 300, 1)}


@pytest.fixture(scope="session")
def shout_reward_model(tmp_path_factory):
    """A Bradley-Terry reward model (tiny Llama from random weights, 20 steps) on the shout pairs,
    byte tokenizer. -> its run directory."""
    from jaxtune.config import from_dict
    from jaxtune.job import TrainJobConfig, run_training

    def build(directory):
        run_training(from_dict(TrainJobConfig, {**FINE_TUNE_COMMON, "model": {"preset": "tiny-llama"},
                     "data": {"kind": "preference", "sources": [{"path": "builtin:shout_train.jsonl"}],
                              "eval_sources": [{"path": "builtin:shout_eval.jsonl"}]},
                     "objective": {"kind": "reward"}, "checkpoint": {"directory": str(directory)},
                     "train": {"steps": 20, "batch_size": 8, "seq_len": 32, "eval_batches": 0}}))

    return shared_directory(tmp_path_factory, "shout_reward_model", build)
