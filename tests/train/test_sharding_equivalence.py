"""Sharded training equals single-device training (8 fake CPU devices, in a subprocess).

The worker trains 3 AdamW steps (grad accumulation 2, uneven padding) on meshes
(data, fsdp, tensor) = (1,1,1), (8,1,1), (2,4,1), (2,2,2), (1,8,1); saves a checkpoint
on (2,2,2) and restores its params on (1,8,1), (8,1,1) and one device.
"""

import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import shared_directory

WORKER = Path(__file__).with_name("multidevice_worker.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The worker's figures, computed once per session (xdist workers share them)."""

    def build(tmp):
        tmp.mkdir(parents=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run([sys.executable, str(WORKER), str(tmp / "out.json"), str(tmp)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]

    return json.loads((shared_directory(tmp_path_factory, "multidevice", build) / "out.json").read_text())


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


@pytest.mark.parametrize("mesh", ["(8, 1, 1)", "(2, 4, 1)", "(2, 2, 2)", "(1, 8, 1)"])
def test_losses_and_params_match_single_device(results, mesh):
    single = results["runs"]["(1, 1, 1)"]
    run = results["runs"][mesh]
    np.testing.assert_allclose(run["losses"], single["losses"], rtol=1e-6, atol=0)
    assert _max_diff(run["params"], single["params"]) < 2e-6
    # The steps really moved the params (so equality above is not trivially true).
    assert len(set(round(x, 6) for x in single["losses"])) == len(single["losses"])


@pytest.mark.parametrize("mesh,axes", [("(8, 1, 1)", (8, 1, 1)), ("(2, 4, 1)", (2, 4, 1)), ("(2, 2, 2)", (2, 2, 2)), ("(1, 8, 1)", (1, 8, 1))])
def test_params_are_sharded_as_declared(results, mesh, axes):
    sizes = dict(zip(("data", "fsdp", "tensor"), axes))
    placement = results["runs"][mesh]["placement"]
    sharded = 0
    for path, leaf in placement.items():
        assert leaf["actual"] == leaf["declared"], path
        # Expected shard shape from the declared spec: each named axis divides its dimension.
        spec = eval(leaf["declared"], {"P": lambda *a: a})  # noqa: S307  (string we wrote: P('fsdp', 'tensor'))
        expected = list(leaf["shape"])
        for i, entry in enumerate(spec):
            for name in (entry if isinstance(entry, tuple) else (entry,)):
                if name is not None:
                    expected[i] //= sizes[name]
        assert leaf["shard_shape"] == expected, path
        # Adam moments live with their parameter.
        assert leaf["mu_shard_shape"] == expected, path
        sharded += expected != leaf["shape"]
    if sizes["fsdp"] > 1 or sizes["tensor"] > 1:
        assert sharded >= 15  # every projection kernel and the embedding/LM head
    else:
        assert sharded == 0  # pure data parallelism replicates params


def test_projection_specs(results):
    placement = results["runs"]["(2, 2, 2)"]["placement"]
    assert placement["['layers_0']['attn']['q_proj']['kernel']"]["declared"] == "P('fsdp', 'tensor')"
    assert placement["['layers_0']['attn']['o_proj']['kernel']"]["declared"] == "P('tensor', 'fsdp')"
    assert placement["['layers_0']['mlp']['down_proj']['kernel']"]["declared"] == "P('tensor', 'fsdp')"
    assert placement["['final_norm']['scale']"]["declared"] == "P()"


@pytest.mark.parametrize("mesh,devices", [("(1, 8, 1)", 8), ("(8, 1, 1)", 8), ("(1, 1, 1)", 1)])
def test_restore_params_on_another_mesh(results, mesh, devices):
    trained = results["runs"]["(2, 2, 2)"]["params"]
    restored = results["restored"][mesh]
    assert restored["step"] == 3
    assert _max_diff(restored["params"], trained) == 0.0
    assert restored["up_proj_devices"] == devices
