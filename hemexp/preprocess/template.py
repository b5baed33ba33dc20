"""The CT template that defines template space: a configured file, or one built from training baselines.

``preprocess.template`` points at a skull-stripped CT template in HU (the paper registers to a common
CT template); when it is null, ``hemexp build-template`` builds one from the skull-stripped baselines of
the first ``preprocess.template_n_patients`` *usable* training patients (sorted IDs), so the template
depends on those patients only and adding others never rebuilds it.

Keep-going: the candidates are the first ``template_n_patients + TEMPLATE_SPARE_PATIENTS`` sorted
training IDs (:func:`template_patients`), and the build job's inputs are their *raw* files, not their
ingest outputs: it ingests each candidate itself (the same :func:`~hemexp.preprocess.pipeline.ingest_patient`,
into a scratch folder under ``template/``) until ``n`` ingest cleanly. A bad candidate (any
:class:`~hemexp.core.errors.PatientInputError`) is skipped, listed in the sidecar ``template/template.json``
and recorded for the failure table as stage ``build_template``; its own ``ingest`` job fails as usual.
With Snakemake's static DAG this is what lets ``--keep-going`` build the template (and so every good
patient) when a template patient is bad: a job whose input comes from a failed job never runs.

Building is iterative rigid averaging with ANTs registrations (the template is only a reference
frame for rigid alignment: shape averaging with SyN would cost minutes and buy nothing here), with
no sharpening so intensities stay HU. The template's brain mask is the majority vote of the input
brain masks carried by the last pass's transforms.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from hemexp.core.errors import PatientInputError, clear_failure, record_failure
from hemexp.core.files import temp_dir, write_json
from hemexp.core.layout import Layout, manifest_path
from hemexp.io.nifti import make_image, save_nifti

BUILD_ITERATIONS = 2
# Candidates beyond template_n_patients: a bad template patient is replaced by the next training ID.
# Adding a training patient whose ID sorts among the candidates rebuilds the template (by design).
TEMPLATE_SPARE_PATIENTS = 1
TEMPLATE_STAGE = "build_template"  # stage name of a skipped candidate's failure record


class TemplateError(RuntimeError):
    """The configured template is missing or unusable (a configuration problem, not a patient's)."""


def template_paths(cfg: dict[str, Any]) -> tuple[Path, Path | None]:
    """(template, mask or None): the configured files, or where ``hemexp build-template`` writes them."""
    pre = cfg["preprocess"]
    if pre["template"]:
        return Path(pre["template"]), Path(pre["template_mask"]) if pre["template_mask"] else None
    base = Layout.of(cfg).template_dir
    return base / "template.nii.gz", base / "template_mask.nii.gz"


def template_patients(train_ids: list[str], n: int) -> list[str]:
    """The template candidates: the first ``n + TEMPLATE_SPARE_PATIENTS`` sorted training IDs (the
    first ``n`` of them that ingest cleanly build the template)."""
    return sorted(train_ids)[: n + TEMPLATE_SPARE_PATIENTS]


def template_info_path(cfg: dict[str, Any]) -> Path:
    """The built template's sidecar: candidates, the patients used, the ones skipped and why."""
    return Layout.of(cfg).template_dir / "template.json"


def usable_baselines(cfg: dict[str, Any], candidates: list[str],
                     ingest: Callable[[dict[str, Any], str, Path], Any]) -> tuple[list, list, dict[str, Any]]:
    """(skull-stripped baselines, brain masks, sidecar info) of the first ``template_n_patients``
    candidates (in sorted order) that ``ingest(cfg, patient, out_dir)`` accepts.

    A candidate that raises :class:`PatientInputError` is skipped and recorded (failure table stage
    ``build_template``); records of candidates no longer skipped are removed. No usable candidate ->
    :class:`TemplateError` listing every candidate's problem.
    """
    import nibabel as nib

    n = int(cfg["preprocess"]["template_n_patients"])
    results = cfg["results_dir"]
    brains, masks, used, skipped = [], [], [], []
    with temp_dir(Layout.of(cfg).template_dir, "candidates") as work:
        for pid in sorted(candidates):
            if len(used) == n:
                break
            try:
                ingest(cfg, pid, work / pid)
            except PatientInputError as err:
                shown = err.shareable(manifest_path(cfg).parent, results)  # de-identified, as in the table
                record_failure(results, TEMPLATE_STAGE,
                               PatientInputError(pid, shown.file, f"not used for the template: {shown.problem}"))
                skipped.append({"patient_id": pid, "file": shown.file, "problem": shown.problem})
                continue
            ct = nib.load(str(work / pid / "bl_ct.nii.gz"))
            inside = np.asarray(nib.load(str(work / pid / "brain_bl.nii.gz")).dataobj) > 0
            brains.append(make_image(np.asarray(ct.dataobj, np.float32) * inside, ct.affine))
            masks.append(make_image(inside.astype(np.uint8), ct.affine))
            used.append(pid)
    gone = {s["patient_id"] for s in skipped}
    failures = Layout.of(cfg).failures_dir
    for record in failures.glob(f"{TEMPLATE_STAGE}__*.json") if failures.is_dir() else ():
        pid = record.name[len(TEMPLATE_STAGE) + 2 : -len(".json")]
        if pid not in gone:
            clear_failure(results, TEMPLATE_STAGE, pid)
    info = {"candidates": sorted(candidates), "n_requested": n, "patients": used, "skipped": skipped,
            "complete": len(used) == n}
    if not used:
        problems = "; ".join(f"{s['patient_id']}: {s['problem']}" for s in skipped)
        raise TemplateError(f"no usable training baseline among the template candidates ({problems})")
    return brains, masks, info


def _mask_from_template(data: np.ndarray) -> np.ndarray:
    """Brain mask of a skull-stripped template without a mask file: non-zero voxels, holes filled,
    largest connected component (stray non-zero specks outside the brain are dropped)."""
    filled = ndimage.binary_fill_holes(data != 0)
    labels, n = ndimage.label(filled)
    if n == 0:
        return filled.astype(np.uint8)
    sizes = ndimage.sum_labels(filled, labels, index=np.arange(1, n + 1))
    return (labels == 1 + int(np.argmax(sizes))).astype(np.uint8)


def load_template(cfg: dict[str, Any]) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """(template float32 HU, brain mask uint8), both canonical RAS+ on the same grid."""
    path, mask_path = template_paths(cfg)
    if not path.is_file():
        hint = "" if cfg["preprocess"]["template"] else " (run `hemexp build-template` first)"
        raise TemplateError(f"preprocess.template: file not found: {path}{hint}")
    tmpl = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(tmpl.dataobj, dtype=np.float32)
    if mask_path is not None and mask_path.is_file():
        mimg = nib.as_closest_canonical(nib.load(str(mask_path)))
        mask = (np.asarray(mimg.dataobj) > 0.5).astype(np.uint8)
        if mask.shape != data.shape or not np.allclose(mimg.affine, tmpl.affine, atol=1e-3):
            raise TemplateError(f"preprocess.template_mask: {mask_path} is not on the grid of {path}")
    elif mask_path is not None and cfg["preprocess"]["template_mask"]:
        raise TemplateError(f"preprocess.template_mask: file not found: {mask_path}")
    else:
        mask = _mask_from_template(data)
    if not mask.any():
        raise TemplateError(f"template brain mask is empty: {mask_path or path}")
    return make_image(data, tmpl.affine), make_image(mask, tmpl.affine)


def build_template(
    brains: list[nib.Nifti1Image], masks: list[nib.Nifti1Image], spacing_mm: float, seed: int
) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Template (float32 HU) and brain mask (uint8) from skull-stripped brains and their masks.

    Iterative rigid averaging: register every brain rigidly to the current template, average, repeat
    (:data:`BUILD_ITERATIONS` passes). This is what ``ants.build_template(type_of_transform="Rigid")``
    computes (its shape-update step averages only the non-rigid part of the affines, the identity
    here); it is written out so the final pass's transforms also carry the brain masks, and because
    that function's C++ averaging step prints pages to stdout and leaves temporary ``.mat`` files.
    The first brain, resampled to ``spacing_mm`` isotropic, initialises the template and so fixes the
    template's grid and orientation.
    """
    # Deferred: the Snakefile imports this module (template_paths) at parse time, and ANTs costs seconds.
    from hemexp.preprocess.register import ants_to_nib, apply, nib_to_ants, register, registration_image

    if not brains or len(brains) != len(masks):
        raise ValueError("build_template needs one mask per brain and at least one brain")
    images = [registration_image(nib_to_ants(b), spacing_mm) for b in brains]
    template = images[0]
    with tempfile.TemporaryDirectory(prefix="hemexp_tmpl_") as work:
        for _ in range(BUILD_ITERATIONS):
            mats = [register(template, image, "Rigid", seed, spacing_mm, work) for image in images]
            warped = [apply(template, image, [mat], "linear").numpy() for image, mat in zip(images, mats, strict=True)]
            template = template.new_image_like(np.mean(warped, axis=0).astype(np.float32))
        votes = sum(apply(template, nib_to_ants(mask), [mat], "label").numpy() > 0.5
                    for mask, mat in zip(masks, mats, strict=True))
    mask_data = (votes >= len(images) / 2.0).astype(np.uint8)
    out = ants_to_nib(template, np.float32)
    return make_image(np.asarray(out.dataobj) * mask_data, out.affine), make_image(mask_data, out.affine)


def write_template(template: nib.Nifti1Image, mask: nib.Nifti1Image, cfg: dict[str, Any],
                   info: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write a built template + mask where :func:`template_paths` expects them (atomically), then
    the sidecar ``info`` (:func:`template_info_path`) when given."""
    path, mask_path = template_paths(cfg)
    save_nifti(template, path, np.float32)
    save_nifti(mask, mask_path, np.uint8)
    if info is not None:
        write_json(template_info_path(cfg), info)
    return path, mask_path
