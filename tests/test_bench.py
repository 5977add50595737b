"""`lowbit bench`: runs the quick benchmark scripts of the source checkout and prints their tables."""

import json

import pytest

from lowbit.cli import main as cli


def test_bench_list(capsys):
    assert cli(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("kernels", "generate", "quality", "convert", "serve"):
        assert f"{name} " in listed


def test_bench_unknown_name(capsys):
    assert cli(["bench", "nosuch"]) == 2
    assert "unknown benchmark nosuch" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_kernels_quick(tmp_path, capsys):
    assert cli(["bench", "kernels", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "kernels_cpu.json").read_text())
    formats = ("int4", "int3.5", "int8")
    assert {(r["M"], r["format"]) for r in result["rows"]} == {(m, f) for m in (1, 16, 512) for f in formats}
    assert all(r["time_ms"] > 0 and r["speedup_vs_fp32"] > 0 for r in result["rows"])
    assert result["machine"]["copy_bandwidth_GB_per_s"] > 0
    table = (tmp_path / "kernels_cpu.md").read_text()
    assert "| 4096x4096 | 1 | int4 |" in table
    assert table.strip() in capsys.readouterr().out  # the summary prints the table
