"""benchmarks/accelerator_suite.py on this CPU: without an accelerator it says so and measures nothing;
with --smoke every section runs at toy shapes and the JSON, the Markdown and the tile table are written."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accelerator_suite.py"
SECTIONS = ("kernel_correctness", "kernel_timing", "tile_table", "attention", "train_mfu", "qlora_step")


def _run(out: Path, *extra: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_without_accelerator_it_says_so_and_measures_nothing(tmp_path):
    out = tmp_path / "suite"
    result = _run(out, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "no accelerator" in lines[0], result.stdout
    assert "--smoke" in lines[0]
    # documented: only a JSON that says so, no Markdown, no tile table
    assert sorted(p.name for p in out.iterdir()) == ["accelerator_suite.json"]
    data = json.loads((out / "accelerator_suite.json").read_text())
    assert data["accelerator"] is False and data["backend"] == "cpu"


def test_smoke_runs_every_section(tmp_path):
    out = tmp_path / "suite"
    repo_table = ROOT / "jaxtune" / "kernels" / "tiles.json"
    before = repo_table.read_bytes() if repo_table.exists() else None
    result = _run(out, "--smoke", timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    # a smoke run writes its tile table beside its results, never over the package's
    assert (repo_table.read_bytes() if repo_table.exists() else None) == before
    tiles = out / "tiles.smoke.json"

    data = json.loads((out / "accelerator_suite.json").read_text())
    assert data["smoke"] is True and data["finished"] is True and "stopped" not in data
    assert list(data["sections"]) == list(SECTIONS)
    for key, section in data["sections"].items():
        assert section["status"] == "ok", (key, section["status"], section.get("error"))
        assert section["error"] is None, (key, section["error"])
        assert section["rows"], key
        errors = [row["error"] for row in section["rows"] if row.get("error")]
        assert not errors, (key, errors)
        assert not any("skipped" in str(row.get("note", "")) for row in section["rows"]), key

    correctness = data["sections"]["kernel_correctness"]["rows"]
    assert {row["kind"] for row in correctness} == {"nf4", "fp4", "int4", "int8"}
    assert all(row["pass"] for row in correctness)
    timing = data["sections"]["kernel_timing"]["rows"]
    assert all(row.get(k) for row in timing for k in ("dense_ms", "xla_nf4_ms", "fused_nf4_ms", "fused_int8_ms",
                                                         "fused_int4_ms"))
    assert {row["impl"] for row in data["sections"]["attention"]["rows"]} == {"blockwise", "flash", "cudnn", "xla"}
    assert [row["remat"] for row in data["sections"]["train_mfu"]["rows"]] == ["none", "full"]
    assert all(row["step_ms"] > 0 for row in data["sections"]["train_mfu"]["rows"])
    qlora = data["sections"]["qlora_step"]
    assert qlora["rows"][0]["step_ms"] > 0 and qlora["rows"][0]["estimate_gib"] > 0
    assert qlora["summary"]["optimizer"] == "adamw8bit" and qlora["summary"]["lora_rank"] == 64

    # the tile table: one entry per smoke shape, in tiles.py's format
    table = json.loads(tiles.read_text())
    shapes = {(row["M"], row["K"], row["N"]) for row in timing}
    expected = {f"cpu|nf4|{1 << max(0, (m - 1).bit_length())}|{n}|{k}" for m, k, n in shapes}
    assert set(table) == expected
    for entry in table.values():
        assert entry == "xla" or set(entry) == {"bm", "bn", "bk", "splits", "num_warps", "num_stages"}
    summary = data["sections"]["tile_table"]["summary"]
    assert summary["written"] == len(expected) and summary["tiles_path"] == str(tiles)

    markdown = (out / "accelerator_suite.md").read_text()
    assert markdown.startswith(f"## accelerator suite, {data['date']}, cpu x 1, jax {data['jax_version']}")
    for section in data["sections"].values():
        assert f"### {section['number']}. {section['title']}" in markdown
        header = "| " + " | ".join(h for _, h, _ in section["columns"])
        assert header in markdown, header
    assert markdown in result.stdout  # printed at the end too


def test_tile_table_write_merges_in_the_autotune_format(tmp_path, monkeypatch):
    import pytest

    from jaxtune.kernels import tiles
    from jaxtune.kernels.quant_matmul import Tiles

    path = tmp_path / "tiles.json"
    monkeypatch.setattr(tiles, "TABLE", path)
    tiles._measured.cache_clear()
    assert tiles.measured(16, 4096, 4096, "nf4", "GPU X") is None
    first = tiles.key("GPU X", "nf4", 16, 4096, 4096)
    assert tiles.write({first: Tiles(bm=16, bn=64, bk=64, splits=8, num_warps=4, num_stages=4)}) == path
    assert tiles.measured(16, 4096, 4096, "nf4", "GPU X") == Tiles(bm=16, bn=64, bk=64, splits=8, num_warps=4,
                                                                  num_stages=4)  # re-read after the write
    second = tiles.key("GPU X", "nf4", 2048, 4096, 4096)
    tiles.write({second: "xla"}, path)
    table = json.loads(path.read_text())
    assert table == {first: {"bm": 16, "bn": 64, "bk": 64, "splits": 8, "num_warps": 4, "num_stages": 4},
                     second: "xla"}
    assert path.read_text() == json.dumps(table, indent=1, sort_keys=True) + "\n"  # qlora_matmul --autotune's format
    assert tiles.choose(2048, 4096, 4096, "nf4", 64, "GPU X") is None  # measured: XLA wins there
    with pytest.raises(ValueError):
        tiles.write({second: {"bm": 16, "colour": "red"}}, path)
    tiles._measured.cache_clear()
