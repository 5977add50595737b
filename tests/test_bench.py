"""`lowbit bench`: runs the quick benchmark scripts of the source checkout and prints their tables."""

import json
from pathlib import Path

import pytest

from lowbit.cli import main as cli

REPO = Path(__file__).resolve().parents[1]


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


def test_quality_merge_of_a_merge(tmp_path, monkeypatch):
    # bench_quality --merge on its own committed ablation parts: merging a merge with another part gives the
    # merge of all three, one note naming each part once; a part from another kind of run is refused.
    results = REPO / "benchmarks" / "results"
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_quality
    a, b, c = (results / f"quality_smollm2_gptq_ablations_{p}.json" for p in "abc")
    bench_quality.merge([a, b], tmp_path / "ab", [])
    bench_quality.merge([tmp_path / "ab.json", c], tmp_path / "abc", [])
    bench_quality.merge([a, b, c], tmp_path / "direct", [])
    nested, direct = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("abc", "direct"))
    assert nested["rows"] == direct["rows"] and len(direct["rows"]) == 1 + sum(
        len(json.loads(p.read_text())["rows"]) - 1 for p in (a, b, c))
    assert nested["merged_from"] == direct["merged_from"] == [str(a), str(b), str(c)]
    table = (tmp_path / "abc.md").read_text()
    assert table.count("Merged from") == 1 and table == (tmp_path / "direct.md").read_text()
    with pytest.raises(ValueError, match="not a parallel run"):
        bench_quality.merge([a, results / "quality_smollm2_budget.json"], tmp_path / "bad", [])
