"""Registration with ANTsPy: baseline rigid to the CT template, follow-up rigid+affine to the baseline.

The paper's recipe: skull-stripped baseline rigidly registered to a common CT template; follow-up
affinely co-registered to the baseline; masks carried along with a label interpolator. Every
transform is kept as an ITK ``.mat`` file under ``<patient>/transforms/`` so any model-grid output
(samples, probability maps) can be mapped back to the patient's native baseline scan
(:func:`to_native`) and native data onto the grid (:func:`to_model_grid`).

Determinism: ANTs' Mattes metric samples voxels at random, and multi-threaded accumulation changes
floating-point order. Every call passes a non-zero ``random_seed`` (:func:`ants_seed`: ANTs treats 0
as "seed from the clock"), and ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` defaults to 1 (set in
``hemexp/__init__`` so it precedes any ANTs import; ITK reads it once per process), so a rerun gives
bit-identical transforms. Images are smoothed and resampled to ``registration_mm`` first: a rigid or
affine transform is a physical-space object, so estimating it at the model's coarse resolution is
accurate (sub-0.3 mm on the template) and an order of magnitude cheaper than at 1 mm.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import ants  # ITK's one-thread default is already set: hemexp/__init__ runs before this module
import nibabel as nib
import numpy as np

from hemexp.core.files import read_json, write_json
from hemexp.io.nifti import affine_spacing_mm, make_image
from hemexp.preprocess.grid import ModelGrid
from hemexp.preprocess.transform_files import (  # noqa: F401  (re-exported: the names writers use)
    BL_TO_TEMPLATE,
    FU_TO_BL,
    FU_TO_BL_RIGID,
    MODEL_GRID,
    NATIVE_GRID,
    TRANSFORMS_DIR,
)

# nibabel affines map voxels to RAS+ mm, ITK/ANTs uses LPS+: flip the first two physical axes.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


# User-facing interpolation names -> ANTs interpolators. Label images use genericLabel, which picks
# the label with the largest Gaussian-weighted vote: it behaves like nearest neighbour when
# upsampling and avoids nearest neighbour's dropped voxels when downsampling (1 mm -> 3 mm).
INTERPOLATORS = {
    "linear": "linear",
    "nearest": "nearestNeighbor",
    "label": "genericLabel",
    "bspline": "bSpline",
}
LABEL_INTERPOLATORS = {"nearestNeighbor", "genericLabel", "multiLabel"}


def nib_to_ants(img: nib.Nifti1Image) -> ants.ANTsImage:
    """NIfTI (RAS affine) -> ANTs image (LPS origin/direction), float32, same voxel order.

    Hand-written because ``ants.nifti_to_ants`` in antspyx 0.6.1 calls removed nibabel/numpy APIs and
    copies the RAS qform into ITK's LPS fields unchanged.
    """
    aff = _RAS_TO_LPS @ np.asarray(img.affine, dtype=np.float64)
    spacing = np.asarray(affine_spacing_mm(aff))
    direction = aff[:3, :3] / spacing
    data = np.ascontiguousarray(np.asarray(img.dataobj, dtype=np.float32))
    return ants.from_numpy(data, origin=aff[:3, 3].tolist(), spacing=spacing.tolist(), direction=direction)


def ants_to_nib(img: ants.ANTsImage, dtype: type | np.dtype = np.float32) -> nib.Nifti1Image:
    """ANTs image -> NIfTI with a RAS affine (inverse of :func:`nib_to_ants`)."""
    aff = np.eye(4)
    aff[:3, :3] = np.asarray(img.direction) * np.asarray(img.spacing)
    aff[:3, 3] = img.origin
    data = img.numpy()
    if np.issubdtype(np.dtype(dtype), np.integer):
        data = np.rint(data)
    return make_image(data.astype(dtype), _RAS_TO_LPS @ aff)


def registration_image(img: ants.ANTsImage, mm: float) -> ants.ANTsImage:
    """Gaussian-smooth (sigma = half the target spacing, anti-aliasing) and resample to ``mm`` isotropic."""
    if min(img.spacing) >= mm:
        return img
    smooth = ants.smooth_image(img, sigma=mm / 2.0, sigma_in_physical_coordinates=True)
    return ants.resample_image(smooth, (mm, mm, mm), use_voxels=False, interp_type=0)


def ants_seed(seed: int) -> int:
    """The ``--random-seed`` ANTs gets for a HemExp seed: always in [1, 2**31 - 1].

    antsRegistration seeds its metric sampler from the system clock when the seed is 0, so the
    config's default ``seed: 0`` passed through unchanged made every run register differently (seen as
    templates differing by up to 47 HU between two runs of the same config). Shifting by one keeps
    distinct config seeds distinct.
    """
    return int(seed) % (2**31 - 1) + 1


def register(
    fixed: ants.ANTsImage,
    moving: ants.ANTsImage,
    kind: str,
    seed: int,
    registration_mm: float,
    workdir: str | Path,
    initial_transform: str | None = None,
) -> str:
    """Estimate a linear transform (``kind``: ANTs 'Rigid' or 'Affine'); returns the ``.mat`` path.

    The result maps *fixed* physical points to *moving* points (ANTs' forward transform), so
    ``ants.apply_transforms(fixed=ref, moving=moving, transformlist=[mat])`` pulls ``moving`` onto
    ``ref``. With ``initial_transform`` the output is the collapsed composite (initial included).
    """
    prefix = tempfile.mkdtemp(prefix=f"{kind.lower()}_", dir=workdir)
    out = ants.registration(
        registration_image(fixed, registration_mm),
        registration_image(moving, registration_mm),
        type_of_transform=kind,
        initial_transform=initial_transform,
        outprefix=str(Path(prefix) / "reg_"),
        random_seed=ants_seed(seed),
    )
    (mat,) = out["fwdtransforms"]
    return mat


def register_baseline(template: ants.ANTsImage, bl_brain: ants.ANTsImage, seed: int, registration_mm: float,
                      out_dir: str | Path, workdir: str | Path) -> Path:
    """Rigid baseline -> template step; writes ``out_dir/bl_to_template.mat`` and returns its path.

    Its own step so a baseline-only patient (``hemexp simulate``) is registered exactly as a pipeline one.
    """
    out = Path(out_dir) / BL_TO_TEMPLATE
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(register(template, bl_brain, "Rigid", seed, registration_mm, workdir), out)
    return out


def register_followup(bl_brain: ants.ANTsImage, fu_brain: ants.ANTsImage, seed: int, registration_mm: float,
                      out_dir: str | Path, workdir: str | Path) -> Path:
    """Follow-up -> baseline: rigid, then affine initialised by it; writes ``fu_to_bl_rigid.mat`` and
    ``fu_to_bl.mat`` (the composite) into ``out_dir`` and returns the latter's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fu_rigid = register(bl_brain, fu_brain, "Rigid", seed, registration_mm, workdir)
    fu_affine = register(bl_brain, fu_brain, "Affine", seed, registration_mm, workdir, initial_transform=fu_rigid)
    shutil.copyfile(fu_rigid, out_dir / FU_TO_BL_RIGID)
    shutil.copyfile(fu_affine, out_dir / FU_TO_BL)
    return out_dir / FU_TO_BL


def register_patient(
    template: ants.ANTsImage,
    bl_brain: ants.ANTsImage,
    fu_brain: ants.ANTsImage,
    seed: int,
    registration_mm: float,
    out_dir: str | Path,
) -> dict[str, float]:
    """Write the three transforms of one patient into ``out_dir``; returns seconds per step."""
    with tempfile.TemporaryDirectory(prefix="hemexp_reg_") as work:
        t0 = time.perf_counter()
        register_baseline(template, bl_brain, seed, registration_mm, out_dir, work)
        t1 = time.perf_counter()
        register_followup(bl_brain, fu_brain, seed, registration_mm, out_dir, work)
        t2 = time.perf_counter()
    return {"rigid": t1 - t0, "affine": t2 - t1}


def apply(
    reference: ants.ANTsImage, moving: ants.ANTsImage, transforms: list[str | Path], interpolation: str,
    invert: list[bool] | None = None,
) -> ants.ANTsImage:
    """Resample ``moving`` onto ``reference`` through ``transforms`` (ANTs order: last applied first)."""
    interp = INTERPOLATORS.get(interpolation, interpolation)
    return ants.apply_transforms(
        fixed=reference,
        moving=moving,
        transformlist=[str(t) for t in transforms],
        interpolator=interp,
        whichtoinvert=invert,
        defaultvalue=0,
    )


def _grid_reference(grid: ModelGrid) -> ants.ANTsImage:
    return nib_to_ants(grid.image(dtype=np.float32))


def _out_dtype(img: nib.Nifti1Image, interpolation: str) -> np.dtype:
    if INTERPOLATORS.get(interpolation, interpolation) in LABEL_INTERPOLATORS:
        return img.get_data_dtype()
    return np.dtype(np.float32)


def transforms_to_grid(patient_dir: str | Path, timepoint: str) -> list[Path]:
    """Transform chain that pulls a native ``timepoint`` ('bl' or 'fu') image onto the model grid."""
    tdir = Path(patient_dir) / TRANSFORMS_DIR
    if timepoint == "bl":
        return [tdir / BL_TO_TEMPLATE]
    if timepoint == "fu":
        return [tdir / BL_TO_TEMPLATE, tdir / FU_TO_BL]
    raise ValueError(f"timepoint must be 'bl' or 'fu', not {timepoint!r}")


def to_model_grid(
    img: nib.Nifti1Image, patient_dir: str | Path, timepoint: str, interpolation: str = "linear"
) -> nib.Nifti1Image:
    """Map a native-space image of ``timepoint`` ('bl' or 'fu') onto the patient's model grid.

    ``interpolation``: 'linear' (CT), 'label' or 'nearest' (masks; output keeps the input dtype).
    """
    grid = ModelGrid.load(Path(patient_dir) / TRANSFORMS_DIR / MODEL_GRID)
    out = apply(_grid_reference(grid), nib_to_ants(img), transforms_to_grid(patient_dir, timepoint), interpolation)
    return ants_to_nib(out, _out_dtype(img, interpolation))


def to_native(img_on_model_grid: nib.Nifti1Image, patient_dir: str | Path, interpolation: str = "linear") -> nib.Nifti1Image:
    """Map any model-grid image (a sample, a probability map) back to the native baseline scan's grid.

    ``interpolation``: 'linear' for CT and probability maps, 'label' or 'nearest' for masks (dtype kept).
    """
    tdir = Path(patient_dir) / TRANSFORMS_DIR
    native = read_json(tdir / NATIVE_GRID)
    ref = nib_to_ants(make_image(np.zeros(native["shape"], dtype=np.float32), np.asarray(native["affine"])))
    out = apply(ref, nib_to_ants(img_on_model_grid), [tdir / BL_TO_TEMPLATE], interpolation, invert=[True])
    return ants_to_nib(out, _out_dtype(img_on_model_grid, interpolation))


def save_native_grid(img: nib.Nifti1Image, patient_dir: str | Path) -> None:
    """Record the native baseline geometry that :func:`to_native` resamples onto."""
    write_json(Path(patient_dir) / TRANSFORMS_DIR / NATIVE_GRID, {"shape": list(img.shape[:3]), "affine": img.affine.tolist()})


def rigid_motion(mat_path: str | Path, centre_lps: tuple[float, float, float] | None = None) -> dict[str, float]:
    """Rotation angle (degrees) and translation length (mm) of a linear ``.mat`` transform.

    The translation is measured at ``centre_lps`` (the transform's own centre by default), which is
    what "how far did the head move" means; used for the summary and the registration test.
    """
    tx = ants.read_transform(str(mat_path))
    params = np.asarray(tx.parameters, dtype=np.float64)
    matrix = params[:9].reshape(3, 3)
    u, _, vt = np.linalg.svd(matrix)
    rot = u @ vt  # closest rotation (an affine's shear/scale removed)
    angle = float(np.degrees(np.arccos(np.clip((np.trace(rot) - 1.0) / 2.0, -1.0, 1.0))))
    centre = np.asarray(centre_lps if centre_lps is not None else tx.fixed_parameters, dtype=np.float64)
    moved = np.asarray(tx.apply_to_point(tuple(centre)))
    return {"rotation_deg": angle, "translation_mm": float(np.linalg.norm(moved - centre))}



def template_on_grid(template: nib.Nifti1Image, template_mask: nib.Nifti1Image,
                     grid: ModelGrid) -> tuple[np.ndarray, np.ndarray]:
    """(template HU float32, template brain mask uint8) on the model grid: no transform, the grid is
    defined in template space; linear and label interpolation. This is where a registered baseline
    should sit: the QC outline and :func:`template_similarity` compare against it."""
    ref = _grid_reference(grid)
    ct = ants.resample_image_to_target(nib_to_ants(template), ref, interp_type="linear")
    mask = ants.resample_image_to_target(nib_to_ants(template_mask), ref, interp_type="genericLabel")
    return ct.numpy().astype(np.float32), (mask.numpy() > 0.5).astype(np.uint8)


def template_similarity(bl_ct: np.ndarray, bl_brain: np.ndarray, template_ct: np.ndarray, template_mask: np.ndarray,
                        spacing_mm: tuple[float, float, float], window: tuple[float, float] = (0.0, 100.0)) -> dict[str, float]:
    """How well the registered baseline sits on the template, on the model grid (numbers only).

    ``brain_dice``: Dice of the registered baseline brain mask with the template brain mask (a head
    differs from the template in size and shape, so a good rigid fit gives roughly 0.85-0.95; a
    misplaced head drops fast); ``ncc``: normalised cross-correlation of baseline and template HU
    (clipped to ``window``, unsmoothed) inside the template mask; ``centroid_offset_mm``: distance
    between the two masks' centroids.
    """
    from hemexp.core.clinical import dice
    from hemexp.preprocess.identity import identity_ncc

    brain, region = np.asarray(bl_brain) > 0, np.asarray(template_mask) > 0
    offset = float("nan")
    if brain.any() and region.any():
        delta = (np.argwhere(brain).mean(axis=0) - np.argwhere(region).mean(axis=0)) * np.asarray(spacing_mm)
        offset = float(np.linalg.norm(delta))
    return {"brain_dice": round(dice(brain, region), 4),
            "ncc": round(identity_ncc(bl_ct, template_ct, region, window, sigma_vox=0.0), 4),
            "centroid_offset_mm": round(offset, 2)}
