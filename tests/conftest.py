import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

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
