"""Per-rule time table from Snakemake benchmark records: known sums, every rule recorded."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from hemexp.core.layout import Layout
from hemexp.workflow.benchmarks import collect_rule_times

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _record(path: Path, seconds: float, rss: float, cpu: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{seconds}\t0:00:{int(seconds):02d}\t{rss}\t1\t1\t1\t0\t0\t50\t{cpu}\n")


def test_rule_times_sum_per_rule(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    for pid, s in (("A001", 2.0), ("A002", 4.0), ("A003", 9.0)):
        _record(layout.benchmark("ingest", layout.log("ingest", pid)), s, 100.0 + s, s / 2)
    _record(layout.benchmark("train_vae", layout.log("train_vae")), 30.0, 900.0, 55.0)
    (layout.benchmarks_dir / "shard").mkdir()
    (layout.benchmarks_dir / "shard" / "A001.tsv").write_text("")  # a killed job's empty record
    table = collect_rule_times(tmp_path).set_index("rule")
    assert list(table.index) == ["train_vae", "ingest"]  # slowest first
    assert table.loc["ingest", "jobs"] == 3 and table.loc["ingest", "total_s"] == pytest.approx(15.0)
    assert table.loc["ingest", "median_s"] == pytest.approx(4.0) and table.loc["ingest", "max_s"] == 9.0
    assert table.loc["ingest", "max_rss_mb"] == pytest.approx(109.0) and table.loc["ingest", "cpu_s"] == 7.5
    assert table["share_pct"].sum() == pytest.approx(100.0)
    assert table.loc["train_vae", "share_pct"] == pytest.approx(100 * 30 / 45)
    on_disk = pd.read_csv(layout.rule_times_table, sep="\t")
    assert len(on_disk) == 2
    assert "train_vae" in layout.rule_times_rst.read_text()


def test_empty_run_writes_a_line(tmp_path: Path) -> None:
    assert collect_rule_times(tmp_path).empty
    assert "No job" in Layout(tmp_path).rule_times_rst.read_text()


def test_every_rule_with_a_log_has_a_benchmark_under_its_own_name() -> None:
    for path in sorted(Path("rules").glob("*.smk")):
        blocks = re.split(r"^\s*rule (\w+):", path.read_text(), flags=re.M)
        for name, body in zip(blocks[1::2], blocks[2::2], strict=True):
            if "log:" in body:
                assert f'L.benchmark("{name}", L.log(' in body, f"{path}: rule {name} has no benchmark record"
