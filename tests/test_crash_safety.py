"""Crash safety: temporaries a killed job leaves are removed by the next write of the same product
(never a live writer's, never another product's); ``hemexp failures`` survives a stale temporary in
``qc/failures/``; a truncated intermediate is one line naming patient, file, problem and the stage to
rerun, never a traceback."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from hemexp.cli import main
from hemexp.core import files
from hemexp.core.errors import PatientInputError, ProductError, collect_failures, reading_product
from hemexp.core.files import atomic_dir, atomic_path, remove_stale_temps, temp_pattern, write_json
from hemexp.core.layout import Layout


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temp_name(final: Path, pid: int, is_dir: bool = False, host: str | None = None) -> Path:
    host = host or files._HOST
    if is_dir:
        return final.parent / f".{final.name}.{host}-{pid}-abcd1234.tmp"
    suffix = "".join(final.suffixes)
    stem = final.name[: len(final.name) - len(suffix)]
    return final.parent / f".{stem}.{host}-{pid}-abcd1234.tmp{suffix}"


def test_temp_names_carry_the_writer_and_match_only_their_product(tmp_path):
    final = tmp_path / "P1.parquet"
    with atomic_path(final) as tmp:
        assert temp_pattern(final).match(tmp.name)
        assert f"-{os.getpid()}-" in tmp.name and tmp.name.endswith(".tmp.parquet")
        assert not temp_pattern(tmp_path / "P10.parquet").match(tmp.name)
        assert not temp_pattern(tmp_path / "P1.npz").match(tmp.name)
        tmp.write_text("x")
    assert final.read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["P1.parquet"]


def test_a_dead_writers_temps_are_removed_on_the_next_write_of_the_same_product(tmp_path):
    final, other = tmp_path / "P1.parquet", tmp_path / "P2.parquet"
    dead = _dead_pid()
    stale = _temp_name(final, dead)
    stale.write_text("half")
    others = _temp_name(other, dead)  # another product's: left for its own next write
    others.write_text("half")
    live = _temp_name(final, os.getppid())  # a live process older than the temp: may be writing it
    live.write_text("busy")
    with atomic_path(final) as tmp:
        tmp.write_text("done")
    assert not stale.exists() and others.exists() and live.exists()


def test_a_killed_folder_write_is_cleaned_and_the_swap_is_never_half_old(tmp_path):
    final = tmp_path / "P1"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old")
    stale = _temp_name(final, _dead_pid(), is_dir=True)
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "a.nii.gz").write_text("partial")
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("new")
    assert not stale.exists() and (final / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["P1"]


def test_temps_without_a_checkable_writer_go_only_when_older_than_this_job(tmp_path):
    final = tmp_path / "summary.json"
    old = tmp_path / ".summary.abcd1234.tmp.json"  # the naming before writer ids, or another host's
    foreign_new = _temp_name(final, 12345, host="otherhost")
    old.write_text("{")
    foreign_new.write_text("{")
    past = files.PROCESS_START - 3600
    os.utime(old, (past, past))
    removed = remove_stale_temps(tmp_path, temp_pattern(final))
    assert removed == [old] and foreign_new.exists()


def test_failures_survives_and_cleans_a_stale_temp(tmp_path, capsys):
    results = tmp_path / "results"
    folder = Layout(results).failures_dir
    write_json(folder / "ingest__P1.json", {"stage": "ingest", "patient_id": "P1", "file": "x.nii.gz",
                                            "problem": "bad", "time": "t"})
    stale = folder / f".ingest__P2.{files._HOST}-{_dead_pid()}-abcd1234.tmp.json"
    stale.write_text('{"stage": "ing')  # killed mid-write
    (folder / "preprocess__P3.json").write_text('{"stage": "prep')  # truncated by hand: skipped, said
    assert main(["failures", "--results", str(results)]) == 0
    table = pd.read_csv(Layout(results).failures_table, sep="\t")
    assert list(table["patient_id"]) == ["P1"] and not stale.exists()
    assert "preprocess__P3.json" in capsys.readouterr().err
    assert "P1" in Layout(results).failures_rst.read_text()
    assert collect_failures(tmp_path / "none").empty  # no failures folder at all: an empty table


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_truncated_ingested_nifti_is_one_line_naming_the_stage(tmp_path, capsys):
    from hemexp.preprocess.pipeline import _load

    path = tmp_path / "ingested" / "P7" / "bl_ct.nii.gz"
    path.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(32, 32, 16)).astype(np.float32), np.eye(4)),
             path)
    _truncate(path)
    with pytest.raises(PatientInputError) as info:
        _load(path)
    err = info.value
    assert err.patient_id == "P7" and err.file == str(path)
    assert "truncated or corrupt" in err.problem and "rerun stage ingest" in err.problem
    assert "hemexp ingest P7" in err.problem


def _shard(tmp_path: Path) -> Path:
    import pyarrow as pa

    from hemexp.io.shards import write_shard

    table = pa.table({"patient_id": ["P5"] * 64, "z": np.arange(64, dtype=np.int32),
                      "x": np.random.default_rng(1).normal(size=64).astype(np.float32)})
    return write_shard(table, tmp_path / "shards" / "P5.parquet", 16)


def test_truncated_shard_is_one_line_naming_the_stage(tmp_path):
    from hemexp.io.shards import read_shard

    path = _shard(tmp_path)
    assert read_shard(path).num_rows == 64
    _truncate(path)
    with pytest.raises(PatientInputError, match=r"patient P5, file .*P5.parquet: slice shard is truncated or "
                                                 r"corrupt .*rerun stage shard"):
        read_shard(path)


def test_truncated_latents_are_one_line_naming_the_stage(tmp_path):
    from hemexp.diffusion.latents import load_latents

    path = tmp_path / "latents" / "P9.npz"
    path.parent.mkdir(parents=True)
    with open(path, "wb") as fh:
        np.savez(fh, z_bl=np.zeros((8, 4, 16, 16), np.float32))
    _truncate(path)
    with pytest.raises(PatientInputError, match=r"patient P9.*latent cache is truncated or corrupt.*rerun "
                                                 r"stage encode.*hemexp encode P9"):
        load_latents(path)


@pytest.mark.parametrize("content", ['{"patient_id": "P4", "volu', ""])
def test_truncated_summary_names_patient_file_and_stage(tmp_path, content):
    from hemexp.preprocess.pipeline import read_summary

    (tmp_path / "summary.json").write_text(content)
    with pytest.raises(PatientInputError, match=r"patient P4.*summary.json.*rerun hemexp preprocess"):
        read_summary("P4", tmp_path)


def test_a_product_without_a_patient_is_a_product_error(tmp_path):
    path = tmp_path / "vae.pt"
    path.write_bytes(gzip.compress(b"x" * 1000)[:20])
    with pytest.raises(ProductError, match=r"vae.pt: VAE model is truncated or corrupt.*rerun stage train-vae"):
        from hemexp.vae.model import load_vae

        load_vae(path)
    with pytest.raises(ProductError, match="missing"), reading_product(tmp_path / "no.json", "latent-stats"):
        json.loads((tmp_path / "no.json").read_text())


def test_truncated_shard_through_the_cli_is_one_line(tmp_path, capsys):
    """``hemexp`` on a damaged intermediate: exit 1, one line, no traceback (here the shard stage's
    reader of preprocessed volumes, through ``hemexp shard``)."""
    from test_pipeline import _write_patient

    raw = tmp_path / "raw"
    row = _write_patient(raw, "P1", (np.eye(3), (0, 0, 0)), (np.eye(3), (0, 0, 0)), 12.0, 16.0)
    pd.DataFrame([row]).to_csv(raw / "manifest.tsv", sep="\t", index=False)
    from workflow_helpers import manifest_config, write_config

    cfg = manifest_config(raw / "manifest.tsv", tmp_path / "results")
    cfg_path = write_config(tmp_path / "config.yaml", cfg)
    pre = Layout.of(cfg).preprocessed("P1")
    (pre / "transforms").mkdir(parents=True)
    write_json(pre / "summary.json", {"patient_id": "P1", "expansion": False})
    (pre / "transforms" / "model_grid.json").write_text('{"spacing')  # truncated
    capsys.readouterr()
    assert main(["shard", "P1", "--config", str(cfg_path)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "patient P1" in line and "model_grid.json" in line and "rerun stage preprocess" in line
    table = collect_failures(cfg["results_dir"])
    assert list(table["stage"]) == ["shard"] and "rerun stage preprocess" in table["problem"].iloc[0]


def test_stale_check_does_not_touch_a_running_writers_temp(tmp_path):
    """A writer in another live process (same host): its temporary survives our cleanup."""
    final = tmp_path / "P1.npz"
    script = (f"import time, sys; sys.path.insert(0, {str(Path.cwd())!r})\n"
              "from hemexp.core.files import atomic_path\n"
              f"with atomic_path({str(final)!r}) as t:\n    t.write_text('x'); print(t, flush=True); time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        tmp = Path(proc.stdout.readline().strip())
        time.sleep(0.2)
        assert tmp.exists() and remove_stale_temps(tmp_path, temp_pattern(final)) == [] and tmp.exists()
    finally:
        proc.kill()
        proc.wait()
    assert remove_stale_temps(tmp_path, temp_pattern(final)) == [tmp]  # killed: now stale
