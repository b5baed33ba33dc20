"""One simulated CT acquisition: pose, grid, slice profile, blood, head holder, noise.

Why by hand: this *is* the simulator. Each scan samples the analytic head at its own grid (standard
DICOM voxel order: i to patient left, j to posterior, k to superior), with the head rigidly moved
by a random pose. Thick slices average sub-slice samples (partial volume); masks are the blood at
slice centres, whose volume (voxel count x voxel volume) is exactly the requested one, because the
clot's level is chosen on this very grid. Image noise is spatially correlated and grows as the slice
gets thinner, as on a real scanner; a small per-scan HU offset mimics calibration drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from hemexp.cohort.synth.anatomy import (
    AIR,
    PARENCHYMA,
    VENTRICLE,
    Anatomy,
    evaluate,
    head_extent,
    may_be_head,
)
from hemexp.cohort.synth.fields import LocalGrid, Points, apply_affine, rotation_matrix
from hemexp.cohort.synth.lesion import OUTSIDE, Lesion, compress_ventricles, displace, ivh_fill

THICKNESS_CHOICES = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)  # common clinical reconstructions (mm)
HU_MIN, HU_MAX = -1024.0, 3071.0


@dataclass(frozen=True)
class ScanGeometry:
    """Grid and head pose of one scan (scanner = patient RAS coordinates, mm)."""

    matrix: int
    inplane_mm: float
    thickness_mm: float
    n_slices: int
    z_first: float  # z of the first slice centre
    rotation: np.ndarray  # head -> scanner
    translation: np.ndarray  # scanner position of the head origin
    pose_deg: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        """RAS affine of the voxel grid (i -> left, j -> posterior, k -> superior, as DICOM stores it)."""
        c = (self.matrix - 1) / 2 * self.inplane_mm
        return np.array([[-self.inplane_mm, 0, 0, c], [0, -self.inplane_mm, 0, c],
                         [0, 0, self.thickness_mm, self.z_first], [0, 0, 0, 1.0]])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.matrix, self.matrix, self.n_slices)

    @property
    def voxel_ml(self) -> float:
        return self.inplane_mm**2 * self.thickness_mm / 1000.0

    def scanner_points(self, z_offset: float = 0.0) -> Points:
        a = self.affine
        i = np.arange(self.matrix, dtype=np.float32)
        k = np.arange(self.n_slices, dtype=np.float32)
        x = np.float32(a[0, 3]) + np.float32(a[0, 0]) * i
        z = np.float32(a[2, 3] + z_offset) + np.float32(a[2, 2]) * k
        return tuple(np.meshgrid(x, x, z, indexing="ij"))  # type: ignore[return-value]

    def to_head(self, pts: Points) -> Points:
        r = self.rotation.T
        return apply_affine(r, -r @ self.translation, pts)


def draw_thickness(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """A clinical slice thickness within the configured range (uniform over the usual values)."""
    choices = [t for t in THICKNESS_CHOICES if bounds[0] - 1e-9 <= t <= bounds[1] + 1e-9]
    return float(rng.choice(choices)) if choices else float(np.round(rng.uniform(*bounds), 2))


def draw_geometry(rng: np.random.Generator, anat: Anatomy, matrix: int, inplane_mm: float,
                  thickness_range: tuple[float, float]) -> ScanGeometry:
    """Random head pose (a few degrees, a few mm) and a slice range covering skull base to vertex."""
    thickness = draw_thickness(rng, thickness_range)
    pose = (float(np.clip(rng.normal(0, 3.0), -7, 7)), float(np.clip(rng.normal(0, 1.5), -4, 4)),
            float(np.clip(rng.normal(0, 1.5), -4, 4)))
    lo, hi = head_extent(anat)
    fov = matrix * inplane_mm
    y_head = fov / 2 - hi[1] - 6.0  # nose side near the edge: room for the head holder behind
    shift = np.clip(rng.normal(0, 1.5, 3), -4, 4)
    translation = np.array([shift[0], y_head + shift[1], shift[2]])
    bottom = -0.75 * anat.axes[2] - 8.0 + translation[2]
    top = hi[2] + 4.0 + 90.0 * np.sin(np.radians(abs(pose[0]))) + translation[2]
    n = int(np.ceil((top - bottom) / thickness))
    return ScanGeometry(matrix=matrix, inplane_mm=float(inplane_mm), thickness_mm=thickness, n_slices=n,
                        z_first=round((bottom + thickness / 2) * 32) / 32,  # exact in float32 and DS
                        rotation=rotation_matrix(pose),
                        translation=translation, pose_deg=pose)


@dataclass
class Blood:
    """Hemorrhage at one timepoint: the clot field, the IPH volume to realise and IVH state."""

    lesion: Lesion
    field: np.ndarray  # on lesion.grid; the clot is field >= level
    target_ml: float  # IPH volume to realise on the scan grid
    mass_ml: float  # volume driving the mass effect
    previous_fill: dict[int, float] = field(default_factory=dict)
    edema_mm: float = 2.0
    edema_hu: float = 3.0


@dataclass
class Rendered:
    """A rendered scan: HU volume (integer-valued float32), masks on the same grid, and facts."""

    hu: np.ndarray
    iph: np.ndarray
    ivh: np.ndarray
    level: float
    fill: dict[int, float]
    info: dict


def rasterize(geom: ScanGeometry, grid: LocalGrid, values: np.ndarray, level: float) -> np.ndarray:
    """uint8 mask of ``values >= level`` (a field on ``grid`` in head coordinates) sampled at the
    slice centres of ``geom``: the same point sampling the rendered IPH masks use."""
    pts = geom.to_head(geom.scanner_points())
    return (grid.sample(values, pts, OUTSIDE) >= level).astype(np.uint8)


def _sub_offsets(thickness: float) -> list[float]:
    """Sub-slice z offsets averaged into one slice (slice profile); the centre comes first."""
    return [0.0] if thickness < 3.0 else [0.0, -thickness / 3.0, thickness / 3.0]


def _select_level(values: np.ndarray, n: int) -> float:
    """The level keeping exactly the ``n`` largest values (the clot of the requested voxel count)."""
    valid = values[values > OUTSIDE / 2]
    if n <= 0 or valid.size == 0:
        return float("inf")
    if n >= valid.size:
        return float(valid.min())
    return float(np.partition(valid, valid.size - n)[valid.size - n])


def _apply_blood(anat: Anatomy, geom: ScanGeometry, blood: Blood, pts_h: Points, pts_a: Points, tissue,
                 chosen: tuple[float, dict[int, float]] | None) -> tuple[float, np.ndarray, np.ndarray, dict[int, float]]:
    """Paint IPH/IVH/edema into ``tissue.hu``; returns (level, iph, ivh, fill) for these points.

    ``chosen`` = (level, fill) from the slice-centre samples; None means choose them here.
    """
    lesion = blood.lesion
    box = np.flatnonzero(lesion.grid.contains(pts_h))
    sub_h = tuple(p.ravel()[box] for p in pts_h)
    f = lesion.grid.sample(blood.field, sub_h, OUTSIDE)  # type: ignore[arg-type]
    lab = tissue.label.ravel()[box]
    paren = np.isin(lab, PARENCHYMA)
    if chosen is None:
        level = _select_level(f[paren], int(round(blood.target_ml / geom.voxel_ml)))
    else:
        level = chosen[0]
    clot = f >= level
    iph = np.zeros(tissue.label.shape, dtype=bool)
    iph.ravel()[box[clot & paren]] = True
    overlap = clot & (lab == VENTRICLE)
    comp_box = tissue.compartment.ravel()[box]
    if chosen is None:
        ml = {int(c): float(np.count_nonzero(overlap & (comp_box == c))) * geom.voxel_ml
              for c in np.unique(comp_box[overlap])}
        fill = ivh_fill(ml, blood.previous_fill)
    else:
        fill = chosen[1]
    ivh = np.zeros(tissue.label.shape, dtype=bool)
    if fill:  # blood reached a ventricle: the contact zone is IVH too (a graze below the minimum is not)
        ivh.ravel()[box[overlap]] = True
    for cid, frac in fill.items():
        y_level = np.interp(frac, np.linspace(0, 1, 101), anat.ventricle_y_quantiles[cid])
        ivh |= (tissue.compartment == cid) & (pts_a[1] <= y_level)
    hu = tissue.hu
    edema = np.zeros(tissue.label.shape, dtype=bool)
    edema.ravel()[box[(f < level) & (f >= level - blood.edema_mm) & paren]] = True
    hu[edema] -= np.float32(blood.edema_hu)
    if iph.any():
        sel = tuple(p[iph] for p in pts_h)
        hu[iph] = np.float32(lesion.hu_iph) + np.float32(4.0) * lesion.lobulation(sel)  # type: ignore[arg-type]
    if ivh.any():
        hu[ivh] = np.float32(lesion.hu_ivh) + np.float32(3.0) * anat.texture(tuple(p[ivh] for p in pts_a))  # type: ignore[arg-type]
    return level, iph, ivh & ~iph, fill


def _holder(anat: Anatomy, geom: ScanGeometry, head_xy: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float, int]:
    """2D mask of a curved head holder under the occiput, separated from the scalp by a gap, its HU
    and the number of slices (from the bottom) it spans."""
    pts = geom.scanner_points()
    x, y = pts[0][:, :, 0], pts[1][:, :, 0]
    cx, cy = geom.translation[0], geom.translation[1] + 25.0
    dist = np.hypot(x - cx, y - cy)
    sector = np.abs(np.degrees(np.arctan2(x - cx, -(y - cy)))) < 55.0
    r_in = float(dist[head_xy & sector].max()) + rng.uniform(6.0, 12.0)
    mask = sector & (dist >= r_in) & (dist <= r_in + rng.uniform(4.0, 6.0))
    z_top = geom.translation[2] + 0.5 * anat.axes[2]
    n = int(np.clip(np.ceil((z_top - geom.z_first) / geom.thickness_mm), 0, geom.n_slices))
    return mask, float(rng.uniform(300.0, 600.0)), n


def render_scan(anat: Anatomy, geom: ScanGeometry, blood: Blood | None, rng: np.random.Generator) -> Rendered:
    """Simulate one CT scan of the head (with the hemorrhage ``blood`` if given)."""
    acc = np.zeros(geom.shape, dtype=np.float32)
    level, fill = float("inf"), {}
    iph, ivh = np.zeros(geom.shape, dtype=bool), np.zeros(geom.shape, dtype=bool)
    offsets = _sub_offsets(geom.thickness_mm)
    anat_t = compress_ventricles(anat, blood.lesion.centre, blood.mass_ml) if blood else anat
    for n, off in enumerate(offsets):
        pts_h = geom.to_head(geom.scanner_points(off))
        idx = np.flatnonzero(may_be_head(anat, pts_h))  # the rest is air: skip the costly evaluation
        sub_h = tuple(p.ravel()[idx] for p in pts_h)
        sub_a = displace(sub_h, blood.lesion.centre, blood.mass_ml, anat) if blood else sub_h  # type: ignore[arg-type]
        tissue = evaluate(anat_t, sub_a)  # type: ignore[arg-type]
        if blood is not None:
            lv, m_iph, m_ivh, f = _apply_blood(anat, geom, blood, sub_h, sub_a, tissue, (level, fill) if n else None)  # type: ignore[arg-type]
            if n == 0:
                level, fill = lv, f
                iph.ravel()[idx], ivh.ravel()[idx] = m_iph, m_ivh
        plane = np.full(geom.shape, anat.hu["air"], dtype=np.float32)
        plane.ravel()[idx] = tissue.hu
        acc += plane
        if n == 0:
            head = np.zeros(geom.shape, dtype=bool)
            head.ravel()[idx] = tissue.label != AIR
            head_xy = head.any(axis=2)
            brain_ml = float(np.count_nonzero(np.isin(tissue.label, (*PARENCHYMA, VENTRICLE)))) * geom.voxel_ml
    hu = acc / np.float32(len(offsets))
    holder, holder_hu, holder_n = _holder(anat, geom, head_xy, rng)
    hu[:, :, :holder_n][holder] = holder_hu
    hu = ndimage.gaussian_filter(hu, sigma=(0.4, 0.4, 0.0))  # scanner point-spread function
    hu += np.float32(rng.normal(0.0, 1.5)) * (hu > -500)
    hu += _noise(rng, geom.shape, float(rng.uniform(2.5, 4.0)) * np.sqrt(5.0 / geom.thickness_mm))
    hu = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.float32)
    info = {"brain_ml": brain_ml, "level": level, "holder_hu": holder_hu}
    return Rendered(hu=hu, iph=iph.astype(np.uint8), ivh=ivh.astype(np.uint8), level=level, fill=fill, info=info)


def _noise(rng: np.random.Generator, shape: tuple[int, int, int], sd: float) -> np.ndarray:
    """In-plane correlated Gaussian noise of standard deviation ``sd`` (HU)."""
    white = rng.standard_normal(shape, dtype=np.float32)
    sigma = (0.7, 0.7, 0.0)
    delta = np.zeros((15, 15, 1), np.float32)
    delta[7, 7, 0] = 1.0
    gain = float(np.sqrt(np.sum(ndimage.gaussian_filter(delta, sigma) ** 2)))
    return ndimage.gaussian_filter(white, sigma) * np.float32(sd / gain)
