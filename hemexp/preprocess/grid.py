"""The model grid: template space at ``preprocess.spacing_mm``, centre-cropped in-plane to ``preprocess.crop``.

Every patient's baseline and follow-up are resampled onto the *same* grid, so a slice index ``z`` means
the same anatomical level for every patient and the VAE/diffusion models see fixed-size images. The
grid is derived from the template's brain mask alone (its axes, the in-plane centre of the brain's
bounding box, and the brain's full superior-inferior extent), so it depends on nothing patient-specific
and is identical for every job that uses the same template and config.

Written by hand because it is a small piece of geometry that no library offers as such: a box in the
template's physical space, not a resampling operation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from hemexp.core.files import write_json
from hemexp.io.nifti import affine_spacing_mm, make_image

# Slices of padding above and below the template brain, so partial-volume edges are never cut.
Z_PAD_SLICES = 1


@dataclass(frozen=True)
class ModelGrid:
    """A regular 3D grid in template (RAS+) space: ``affine`` maps voxel (x, y, z) to physical mm."""

    affine: np.ndarray
    shape: tuple[int, int, int]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return affine_spacing_mm(self.affine)

    def z_mm(self) -> np.ndarray:
        """Superior-inferior position (mm, template space) of every axial slice centre."""
        z = np.arange(self.shape[2], dtype=np.float64)
        return (self.affine[2, 2] * z + self.affine[2, 3]).astype(np.float32)

    def image(self, data: np.ndarray | None = None, dtype: type = np.float32) -> nib.Nifti1Image:
        """A NIfTI image on this grid (zeros when ``data`` is None)."""
        if data is None:
            data = np.zeros(self.shape, dtype=dtype)
        if tuple(data.shape) != self.shape:
            raise ValueError(f"array shape {data.shape} does not match the model grid {self.shape}")
        return make_image(np.asarray(data, dtype=dtype), self.affine)

    def to_dict(self) -> dict:
        return {"affine": self.affine.tolist(), "shape": list(self.shape), "spacing_mm": list(self.spacing)}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> ModelGrid:
        return cls(np.asarray(data["affine"], dtype=np.float64), tuple(int(v) for v in data["shape"]))

    @classmethod
    def load(cls, path: str | Path) -> ModelGrid:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def matches(self, img: nib.Nifti1Image, atol: float = 1e-3) -> bool:
        """True when ``img`` lies exactly on this grid (same shape and affine)."""
        return tuple(img.shape[:3]) == self.shape and np.allclose(img.affine, self.affine, atol=atol)


def _axes(affine: np.ndarray) -> np.ndarray:
    """Unit direction vectors (columns) of an image's voxel axes."""
    return affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)


def _rows_times(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``points @ matrix`` for (N, 3) x (3, 3) as three broadcasts: a tall-skinny BLAS matmul is
    ~50x slower here (thread start-up on a busy machine) for millions of brain voxels."""
    return points[:, :1] * matrix[0] + points[:, 1:2] * matrix[1] + points[:, 2:3] * matrix[2]


def _brain_points(mask_img: nib.Nifti1Image) -> np.ndarray:
    """Physical (RAS mm) coordinates of every brain voxel of a mask, shape (N, 3)."""
    idx = np.argwhere(np.asarray(mask_img.dataobj) > 0).astype(np.float64)
    if len(idx) == 0:
        raise ValueError("template brain mask is empty")
    return _rows_times(idx, mask_img.affine[:3, :3].T) + mask_img.affine[:3, 3]


def _brain_extent(mask: nib.Nifti1Image, axes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) of the brain's coordinates along the template's own axes (mm).

    With orthogonal voxel axes (every unsheared scan) a coordinate depends on one voxel index only,
    so the brain's index bounding box gives the extent exactly without touching every voxel."""
    data = np.asarray(mask.dataobj) > 0
    if not data.any():
        raise ValueError("template brain mask is empty")
    if not np.allclose(axes.T @ axes, np.eye(3), atol=1e-5):
        proj = _rows_times(_brain_points(mask), axes)
        return proj.min(axis=0), proj.max(axis=0)
    spacing = np.asarray(affine_spacing_mm(mask.affine))
    offset = axes.T @ mask.affine[:3, 3]
    bounds = [np.flatnonzero(data.any(axis=tuple(j for j in range(3) if j != a)))[[0, -1]] for a in range(3)]
    lo = np.array([b[0] for b in bounds]) * spacing + offset
    hi = np.array([b[1] for b in bounds]) * spacing + offset
    return lo, hi


def model_grid(template_mask: nib.Nifti1Image, spacing_mm: list[float], crop: list[int]) -> ModelGrid:
    """The model grid for a template: axes of the (canonical) template, in-plane ``crop`` pixels at
    ``spacing_mm[:2]`` centred on the brain's bounding box, z spanning the whole brain (+ padding).

    The template is brought to RAS+ first, so grid axes x, y, z are right, anterior, superior and an
    axial slice is ``[:, :, z]`` as everywhere else in the pipeline.
    """
    mask = nib.as_closest_canonical(template_mask)
    axes = _axes(mask.affine)
    lo, hi = _brain_extent(mask, axes)
    sx, sy, sz = (float(v) for v in spacing_mm)
    nx, ny = (int(v) for v in crop)
    nz = int(np.ceil((hi[2] - lo[2]) / sz)) + 1 + 2 * Z_PAD_SLICES
    centre = (lo + hi) / 2.0
    start = np.array([centre[0] - (nx - 1) / 2.0 * sx, centre[1] - (ny - 1) / 2.0 * sy, lo[2] - Z_PAD_SLICES * sz])
    affine = np.eye(4)
    affine[:3, :3] = axes * np.array([sx, sy, sz])
    affine[:3, 3] = axes @ start
    return ModelGrid(affine, (nx, ny, nz))


def brain_coverage(grid: ModelGrid, template_mask: nib.Nifti1Image) -> float:
    """Fraction of the template brain that lies inside the grid (< 1 means the crop cuts brain off)."""
    mask = nib.as_closest_canonical(template_mask)
    data = np.asarray(mask.dataobj) > 0
    inv = np.linalg.inv(grid.affine)
    to_grid = inv[:3, :3] @ mask.affine[:3, :3]  # template voxel index -> grid voxel index (linear part)
    if np.allclose(to_grid, np.diag(np.diag(to_grid)), atol=1e-6):  # same axes: test each axis alone
        shift = inv[:3, :3] @ mask.affine[:3, 3] + inv[:3, 3]
        positions = [np.arange(data.shape[a]) * to_grid[a, a] + shift[a] for a in range(3)]
        inside = [((v >= -0.5) & (v <= grid.shape[a] - 0.5)).astype(np.float64) for a, v in enumerate(positions)]
        return float(np.einsum("ijk,i,j,k->", data.astype(np.float64), *inside) / data.sum())
    pts = _brain_points(mask)
    vox = _rows_times(pts - grid.affine[:3, 3], np.linalg.inv(grid.affine[:3, :3]).T)
    return float(np.all((vox >= -0.5) & (vox <= np.array(grid.shape) - 0.5), axis=1).mean())
