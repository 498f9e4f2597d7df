"""The accelerator install extras: `jaxtune[cuda12]` and `jaxtune[tpu]` are JAX's own extras inside
the JAX range jaxtune supports, the launch scripts install them, and the README names them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_extras_are_jaxs_own_inside_the_supported_range():
    project = _project()
    (core,) = [d for d in project["dependencies"] if re.match(r"jax\b(?!lib)[^a-z]", d)]
    supported = core[len("jax"):]
    assert project["optional-dependencies"]["cuda12"] == [f"jax[cuda12]{supported}"]
    assert project["optional-dependencies"]["tpu"] == [f"jax[tpu]{supported}"]


def test_launch_scripts_install_the_extras_and_the_readme_names_them():
    assert 'pip install -q -e ".[cuda12]"' in (ROOT / "launch/gpu_vm.sh").read_text()
    assert "'.[tpu]'" in (ROOT / "launch/tpu_vm.sh").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "jaxtune[cuda12]" in readme and "jaxtune[tpu]" in readme
