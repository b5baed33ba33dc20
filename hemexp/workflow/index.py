"""Training-split indexes: one file listing the training patients' files of a family (shards, latents,
preprocessed summaries, native baseline CTs), written by rule ``gather_index``.

Why (docs/orchestration.md, Scale): a training rule with every training patient's file as input, whose
output thousands of per-patient jobs read (``train_vae`` → ``encode``, ``train_diffusion`` →
``sample``), costs Snakemake a scan of that whole input list per consumer while it builds the DAG:
quadratic in the cohort. With the gather rule in between, each training rule has one input (the
index) and only the gather rule, read by a handful of training rules, holds the long list. The rerun
semantics are unchanged: a changed or added patient file reruns the gather job, whose new index reruns
the training rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hemexp.cohort.patients import workflow_patients
from hemexp.core.errors import PatientInputError
from hemexp.core.files import atomic_path
from hemexp.core.layout import Layout


def training_files(layout: Layout, family: str, train_ids: list[str]) -> list[str]:
    """The family's files of the training patients, sorted by patient (the index's lines)."""
    return [str(layout.indexed_file(family, pid)) for pid in sorted(train_ids)]


# Families whose files lie in a folder that its rule outputs as a whole (`directory()`: rules ingest and
# preprocess), so the workflow can only depend on the folder, not on the file inside it.
FOLDER_FAMILIES = {"summaries": Layout.preprocessed, "native": Layout.ingested}


def training_inputs(layout: Layout, family: str, train_ids: list[str]) -> list[str]:
    """What rule gather_index declares for the family, sorted by patient: each training patient's
    file, or for a folder family the folder its producing rule outputs."""
    folder = FOLDER_FAMILIES.get(family)
    if folder is None:
        return training_files(layout, family, train_ids)
    return [str(folder(layout, pid)) for pid in sorted(train_ids)]


def write_index(cfg: dict[str, Any], family: str) -> tuple[str, int]:
    """Write ``index/train_<family>.txt`` atomically; every listed file must exist (its patient and
    path are named otherwise). Returns (path, number of files)."""
    layout = Layout.of(cfg)
    train = [p.patient_id for p in workflow_patients(cfg) if p.split == "train"]
    files = training_files(layout, family, train)
    for pid, path in zip(sorted(train), files, strict=True):
        if not Path(path).exists():
            raise PatientInputError(pid, path, f"missing {family} file for the training index")
    out = layout.index(family)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text("".join(f"{f}\n" for f in files))
    return str(out), len(files)
