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
