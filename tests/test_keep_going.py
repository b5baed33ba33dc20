"""``snakemake --keep-going`` really keeps going: a real local run (``--cores 2``) on a tiny manifest
cohort of phantom heads with good and bad patients mixed, one of the bad ones among the template
patients, up to the shard stage. The template is built from the first *usable* candidates (the bad
one skipped and recorded), every good patient gets its shard, and every bad one is in
``qc/failures.tsv`` with stage and reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_pipeline import _nan_ct, _rotation, _write_patient
from workflow_helpers import manifest_config, snakemake, write_config

from hemexp.core.layout import Layout
from hemexp.preprocess.template import TEMPLATE_SPARE_PATIENTS

pytestmark = pytest.mark.slow  # ~1-2 minutes: 4 ingests + template + 3 registrations on 2 cores

GOOD_TRAIN = ["TR02", "TR03"]
GOOD_TEST = ["TE01"]
BAD = {"TR01": ("ingest", "baseline IPH mask is empty"), "TE02": ("ingest", "NaN")}


def _empty_baseline_iph(row, raw):
    import nibabel as nib

    from hemexp.io.nifti import make_image

    img = nib.load(raw / row["baseline_iph"])
    nib.save(make_image(np.zeros(img.shape, np.uint8), img.affine), raw / row["baseline_iph"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("keep_going")
    raw = root / "raw"
    poses = [((3, -4, 8), (4, -6, 3), (-5, 2, -3), (-3, 5, -4)), ((0, 5, -6), (-2, 3, 6), (2, 0, 4), (5, -1, 2)),
             ((-2, 3, 4), (3, 2, -2), (4, -3, 1), (-2, -4, 3)), ((1, -2, -5), (-4, 1, 2), (-3, 4, 2), (2, 3, -1))]
    rows = []
    for i, (pid, split) in enumerate([("TR01", "train"), ("TR02", "train"), ("TR03", "train"),
                                      ("TE01", "test"), ("TE02", "test")]):
        r1, s1, r2, s2 = poses[i % len(poses)]
        row = _write_patient(raw, pid, (_rotation(np.array(r1)), s1), (_rotation(np.array(r2)), s2), 12.0, 16.0)
        row.update(split=split, site="A" if split == "train" else "D")
        rows.append(row)
    _empty_baseline_iph(rows[0], raw)  # TR01: the first (sorted) template patient is bad
    _nan_ct(rows[4], raw)  # TE02: NaN voxels in the baseline CT
    pd.DataFrame(rows).to_csv(raw / "manifest.tsv", sep="\t", index=False)
    cfg = manifest_config(raw / "manifest.tsv", results="results")
    cfg["preprocess"].update(skullstrip="builtin", registration_mm=4.0, template_n_patients=2)
    configfile = write_config(root / "config.yaml", cfg)
    L = Layout(Path("results"))  # relative: the rules' outputs are, in the work folder
    targets = [str(L.shard(p)) for p in ["TR01", "TR02", "TR03", "TE01", "TE02"]]
    out = snakemake(root, configfile, "--keep-going", "--cores", "2", *targets, check=False, timeout=900)
    return root, L, out


def test_the_run_fails_but_every_good_patient_is_sharded(run):
    root, L, out = run
    assert out.returncode != 0  # bad patients: the run as a whole failed ...
    for pid in GOOD_TRAIN + GOOD_TEST:  # ... but everyone else went through
        assert (root / L.shard(pid)).is_file(), f"{pid} not sharded:\n{out.stderr[-4000:]}"
    for pid in BAD:
        assert not (root / L.shard(pid)).exists() and not (root / L.ingested(pid)).exists()


def test_template_skips_the_bad_candidate_and_says_so(run):
    root, L, _ = run
    info = json.loads((root / L.template_dir / "template.json").read_text())
    assert info["candidates"] == ["TR01", "TR02", "TR03"][: 2 + TEMPLATE_SPARE_PATIENTS]
    assert info["patients"] == ["TR02", "TR03"] and info["complete"]
    assert [s["patient_id"] for s in info["skipped"]] == ["TR01"]
    assert "baseline IPH mask is empty" in info["skipped"][0]["problem"]
    assert not list((root / L.template_dir).glob(".*"))  # the candidates' scratch folder is gone


def test_failure_table_lists_every_bad_patient_with_stage_and_reason(run):
    root, L, _ = run
    table = pd.read_csv(root / L.failures_table, sep="\t")
    for pid, (stage, reason) in BAD.items():
        hit = table[(table["patient_id"] == pid) & (table["stage"] == stage)]
        assert len(hit) == 1 and reason in hit["problem"].iloc[0], table.to_string()
    skipped = table[table["stage"] == "build_template"]
    assert list(skipped["patient_id"]) == ["TR01"] and "not used for the template" in skipped["problem"].iloc[0]
    assert set(table["patient_id"]) == set(BAD)  # no good patient in the table
    assert "TR01" in (root / L.failures_rst).read_text()  # the report's section
