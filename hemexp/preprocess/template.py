"""The CT template that defines template space: a configured file, or one built from training baselines.

``preprocess.template`` points at a skull-stripped CT template in HU (the paper registers to a common
CT template); when it is null, ``hemexp build-template`` builds one from the skull-stripped baselines of
the first ``preprocess.template_n_patients`` training patients (sorted IDs), so the template depends on
those patients only and adding others never rebuilds it.

Building is iterative rigid averaging with ANTs registrations (the template is only a reference
frame for rigid alignment: shape averaging with SyN would cost minutes and buy nothing here), with
no sharpening so intensities stay HU. The template's brain mask is the majority vote of the input
brain masks carried by the last pass's transforms.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from hemexp.core.layout import Layout
from hemexp.io.nifti import make_image, save_nifti

BUILD_ITERATIONS = 2


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
    """The training patients whose baselines build the template: the first ``n`` sorted IDs."""
    return sorted(train_ids)[:n]


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


def write_template(template: nib.Nifti1Image, mask: nib.Nifti1Image, cfg: dict[str, Any]) -> tuple[Path, Path]:
    """Write a built template + mask where :func:`template_paths` expects them (atomically)."""
    path, mask_path = template_paths(cfg)
    save_nifti(template, path, np.float32)
    save_nifti(mask, mask_path, np.uint8)
    return path, mask_path
