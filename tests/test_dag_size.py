"""The DAG's declared file references grow by a bounded amount per patient (docs/orchestration.md, Scale).

Each reference costs Snakemake work while it builds the DAG, so per-file input lists (a folder's 14
files instead of the folder) or an aggregate re-listed in a per-patient rule make a 10,000-patient dry
run several times the toy anchor's. A dry run of 6 and of 12 patients measures the references that
one more patient adds; the bound catches a regression long before a timed benchmark would.
"""

from __future__ import annotations

import re
from pathlib import Path

from workflow_helpers import manifest_config, snakemake, write_config, write_manifest

# Per added patient (half of them test patients, who add the sampling jobs), measured 2026-12-04:
# 42 input and 16 output references; with per-file lists (before the folder outputs) 115.5 and 73.
MAX_INPUTS_PER_PATIENT = 60
MAX_OUTPUTS_PER_PATIENT = 25


def _references(workdir: Path, n_train: int, n_test: int) -> tuple[int, int]:
    """(input, output) file references of every job a dry run of the default target plans."""
    train = [f"TR{i:02d}" for i in range(n_train)]
    test = [f"TE{i:02d}" for i in range(n_test)]
    manifest = write_manifest(workdir / "raw" / "manifest.tsv", train, test)
    cfg = write_config(workdir / "config.yaml", manifest_config(manifest))
    out = snakemake(workdir, cfg, "--dry-run", "--cores", "1", timeout=300).stdout
    inputs = sum(len(m.split(", ")) for m in re.findall(r"^\s+input: (.*)$", out, flags=re.M))
    outputs = sum(len(m.split(", ")) for m in re.findall(r"^\s+output: (.*)$", out, flags=re.M))
    return inputs, outputs


def test_references_per_added_patient_are_bounded(tmp_path):
    small = _references(tmp_path / "small", 3, 3)
    large = _references(tmp_path / "large", 6, 6)
    added = 6
    per_input, per_output = ((b - a) / added for a, b in zip(small, large, strict=True))
    assert 0 < per_input <= MAX_INPUTS_PER_PATIENT, (small, large)
    assert 0 < per_output <= MAX_OUTPUTS_PER_PATIENT, (small, large)
