"""Hemorrhage mask loading: binary {0,1}, {0,255} and label maps.

Sites export masks differently (ITK-SNAP label maps, binary NIfTI, 0/255 PNG-derived volumes); this is
the one place that turns any of them into a uint8 {0,1} array for IPH or IVH, and :func:`read_mask` is
the one mask-file reader every stage uses (site exports and the pipeline's own {0,1} products alike).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hemexp.core.errors import PatientInputError
from hemexp.io.nifti import read_volume


class MaskFormatError(ValueError):
    """A mask file whose values are neither binary nor a label map with the configured labels."""


def binarise_mask(values: np.ndarray, which: str, labels: dict[str, int], label_map: bool) -> np.ndarray:
    """Return uint8 {0,1} for ``which`` ('iph' or 'ivh') from raw mask values.

    ``label_map`` says the same file holds both structures (IPH and IVH columns point at one file);
    then the configured label value selects the structure. Otherwise any of {0,1} or {0,255} is
    accepted, and a file with other values is rejected rather than guessed at.
    """
    if not np.all(np.isfinite(values)):
        raise MaskFormatError("mask contains NaN or infinite values")
    rounded = np.rint(values).astype(np.int64)
    if not np.allclose(rounded, values, atol=1e-3):
        raise MaskFormatError("mask has non-integer values (is this a CT rather than a mask?)")
    uniq = set(np.unique(rounded).tolist())
    if label_map:
        allowed = {0, *labels.values()}
        if not uniq <= allowed:
            raise MaskFormatError(f"label map has values {sorted(uniq)}; expected a subset of {sorted(allowed)}")
        return (rounded == labels[which]).astype(np.uint8)
    if uniq <= {0, 1}:
        return rounded.astype(np.uint8)
    if uniq <= {0, 255}:
        return (rounded == 255).astype(np.uint8)
    raise MaskFormatError(
        f"binary mask expected ({{0,1}} or {{0,255}}) but found values {sorted(uniq)[:8]}; "
        "if this is a label map, point both the IPH and the IVH column at it"
    )


def read_mask(path: str | Path, patient_id: str, what: str = "mask", *, which: str = "",
              labels: dict[str, int] | None = None, label_map: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 {0,1} 3D mask, 4x4 affine) of a NIfTI mask file, in its stored voxel order.

    The one mask reader. Without ``labels`` it reads a *pipeline product* (preprocessed, sampled,
    baseline-predicted masks), which this pipeline always writes as {0,1}: any other value means a
    foreign or damaged file and is rejected, not thresholded (a 0/255 file would otherwise be copied
    into nnU-Net's input unchanged). With ``labels`` it reads a *site export* and accepts what
    :func:`binarise_mask` accepts ({0,1}, {0,255}, label maps selected by ``which``).

    Every problem is a :class:`PatientInputError` naming patient, file and problem (``what`` names the
    mask in it): missing, unreadable/truncated, not 3D, NaN/inf, or values of the wrong kind.
    """
    data, affine = read_volume(path, patient_id, what=what)
    if labels is None:
        if np.count_nonzero((data != 0) & (data != 1)):
            values = np.unique(data)[:6].tolist()
            raise PatientInputError(patient_id, path, f"{what} is not binary (values {values}; expected 0 and 1)")
        return data.astype(np.uint8), affine
    try:
        return binarise_mask(data, which, labels, label_map), affine
    except MaskFormatError as err:
        raise PatientInputError(patient_id, path, f"{what}: {err}") from err


# ---------------------------------------------------------------- masks on another grid of the same space
#
# Annotation tools save a mask on the grid of the image they were drawn on: ITK-SNAP and 3D Slicer on
# the CT they opened, dcm2niix's conversion of a DICOM series (for a gantry-tilted series that is a
# tilt-corrected grid of its own, with e.g. 2.62 mm equidistant slices), or a DICOM SEG frame stack on the
# CT's own (possibly tilted, unevenly spaced) slices. All of them share the CT's physical (scanner)
# space, so such a mask is carried onto the CT grid by nearest-neighbour resampling in world
# coordinates, and then checked twice:
#
# * Field of view: every foreground voxel centre must fall inside the CT grid, up to FOV_SLACK_VOXELS CT
#   voxels beyond its outer voxel edges (a lesion touching the border of a slightly differently cropped
#   grid); a mask further out was drawn on another scan or carries a wrong affine.
# * Volume: nearest-neighbour resampling moves the mask boundary by at most half a voxel, which for a
#   hemorrhage of realistic size (>= ~0.5 mL on <= 5 mm voxels) changes the volume by ~1-2 % (the gains
#   and losses along the surface largely cancel). The volume on the CT grid must equal the volume on the
#   mask's own grid within VOLUME_RTOL (5 %) or, for tiny masks where one voxel already is several percent,
#   within VOLUME_ATOL_VOXELS voxels of the coarser of the two grids, whichever is larger. Anything more
#   means structure was lost (a much finer mask grid whose thin parts fall between CT voxel centres, or
#   foreground clipped at the field-of-view edge): rejected rather than silently changing the reference.
FOV_SLACK_VOXELS = 1.0
VOLUME_RTOL = 0.05
VOLUME_ATOL_VOXELS = 2.0


def voxel_volume_mm3(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


def fov_excess_mm(points_world: np.ndarray, ref_shape: tuple[int, ...], ref_affine: np.ndarray) -> float:
    """How far (mm) the farthest of ``points_world`` (N x 3) lies outside the outer voxel edges of the
    grid (``ref_shape``, ``ref_affine``); 0 when all lie inside."""
    if len(points_world) == 0:
        return 0.0
    ref_affine = np.asarray(ref_affine, dtype=np.float64)
    ijk = nib_apply(np.linalg.inv(ref_affine), points_world)
    spacing = np.linalg.norm(ref_affine[:3, :3], axis=0)
    lo = -0.5 - ijk
    hi = ijk - (np.asarray(ref_shape[:3], dtype=np.float64) - 0.5)
    excess = np.maximum(np.maximum(lo, hi), 0.0) * spacing
    return float(np.linalg.norm(excess, axis=1).max())


def nib_apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``affine`` (4x4) applied to N x 3 points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ np.asarray(affine, dtype=np.float64)[:3, :3].T + np.asarray(affine, dtype=np.float64)[:3, 3]


def resample_nearest(mask: np.ndarray, affine: np.ndarray, ref_shape: tuple[int, ...],
                     ref_affine: np.ndarray) -> np.ndarray:
    """uint8 mask on the grid (``ref_shape``, ``ref_affine``): each reference voxel takes the value of
    the mask voxel nearest to its centre in world coordinates (0 outside the mask's grid)."""
    from scipy import ndimage

    vox = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(ref_affine, dtype=np.float64)
    out = ndimage.affine_transform(np.asarray(mask, dtype=np.uint8), vox[:3, :3], offset=vox[:3, 3],
                                   output_shape=tuple(ref_shape[:3]), order=0, mode="constant", cval=0)
    return (out > 0).astype(np.uint8)


def check_resampled(patient_id: str, path: str | Path, what: str, source_ml: float, source_voxel_ml: float,
                    points_world: np.ndarray, resampled: np.ndarray, ref_affine: np.ndarray,
                    grid_text: str = "") -> dict:
    """Field-of-view and volume checks of a mask carried onto the CT grid (rules above); raises
    :class:`PatientInputError` naming patient, file and problem, else returns the facts for ``ingest``."""
    ref_shape = resampled.shape
    suffix = f" ({grid_text})" if grid_text else ""
    excess = fov_excess_mm(points_world, ref_shape, ref_affine)
    ct_spacing = np.linalg.norm(np.asarray(ref_affine, dtype=np.float64)[:3, :3], axis=0)
    if excess > FOV_SLACK_VOXELS * float(ct_spacing.max()):
        raise PatientInputError(patient_id, path, f"{what} extends {excess:.0f} mm beyond the CT field of view: "
                                f"drawn on another scan, or its header geometry is wrong{suffix}")
    ct_voxel_ml = voxel_volume_mm3(ref_affine) / 1000.0
    out_ml = float(np.count_nonzero(resampled)) * ct_voxel_ml
    tol_ml = max(VOLUME_RTOL * source_ml, VOLUME_ATOL_VOXELS * max(source_voxel_ml, ct_voxel_ml))
    if source_ml > 0 and out_ml == 0:
        raise PatientInputError(patient_id, path, f"{what} ({source_ml:.3g} mL) vanishes when resampled onto the "
                                f"CT grid: it lies between the CT's voxel centres{suffix}")
    if abs(out_ml - source_ml) > tol_ml:
        raise PatientInputError(
            patient_id, path, f"{what} volume changes from {source_ml:.3g} mL to {out_ml:.3g} mL when resampled onto "
            f"the CT grid (more than {100 * VOLUME_RTOL:g} % / {VOLUME_ATOL_VOXELS:g} voxels): structure lost{suffix}")
    return {"resampled": True, "source_ml": round(source_ml, 4), "ct_grid_ml": round(out_ml, 4),
            "fov_excess_mm": round(excess, 3)}


def foreground_world(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World coordinates (N x 3) of the centres of the foreground voxels of ``mask``."""
    return nib_apply(affine, np.argwhere(np.asarray(mask) > 0).astype(np.float64))


# ---------------------------------------------------------------- DICOM SEG


def is_dicom_seg_path(path: str | Path) -> bool:
    """A file that is not NIfTI: read as a DICOM Segmentation (the manifest may name a SEG file)."""
    from hemexp.io.nifti import is_nifti_path

    path = Path(path)
    return path.is_file() and not is_nifti_path(path)


class SegFrames:
    """The chosen segment of a DICOM SEG as a stack of parallel planes in LPS patient space.

    ``frames`` (n, rows, cols) uint8 {0,1}, ``origins`` (n, 3) ImagePositionPatient (LPS mm),
    ``row_dir``/``col_dir`` the ImageOrientationPatient cosines, ``spacing`` (row, column) PixelSpacing.
    """

    def __init__(self, frames: np.ndarray, origins: np.ndarray, iop: np.ndarray, spacing: tuple[float, float],
                 nominal_mm: float):
        self.normal = np.cross(iop[:3], iop[3:])
        order = np.argsort(origins @ self.normal)
        self.frames, self.origins = frames[order], origins[order]
        self.row_dir, self.col_dir = iop[:3], iop[3:]
        self.spacing = spacing
        self.t = self.origins @ self.normal
        gaps = np.diff(self.t)
        if np.any(gaps <= 1e-3):
            raise MaskFormatError("SEG has several frames of this segment at one slice position")
        # Each frame stands for the slab half-way to its neighbouring frames; where a neighbour is missing
        # (a gap of two slices or more: SEG writers omit empty frames) or at the ends, half the nominal
        # slice spacing (the smallest spacing between any two frames of the SEG).
        half = np.where(gaps <= 1.75 * nominal_mm, gaps / 2, nominal_mm / 2)
        self.lo = self.t - np.r_[nominal_mm / 2, half]
        self.hi = self.t + np.r_[half, nominal_mm / 2]
        self.thickness = self.hi - self.lo

    def volume_ml(self) -> float:
        px = self.spacing[0] * self.spacing[1]
        return float(sum(np.count_nonzero(f) * px * th for f, th in zip(self.frames, self.thickness, strict=True))) / 1000

    def voxel_ml(self) -> float:
        return float(self.spacing[0] * self.spacing[1] * np.median(self.thickness)) / 1000

    def points_ras(self) -> np.ndarray:
        pts = []
        for f, o in zip(self.frames, self.origins, strict=True):
            r, c = np.nonzero(f)
            pts.append(o + c[:, None] * self.spacing[1] * self.row_dir + r[:, None] * self.spacing[0] * self.col_dir)
        lps = np.concatenate(pts) if pts else np.zeros((0, 3))
        return lps * np.array([-1.0, -1.0, 1.0])

    def resample(self, ref_shape: tuple[int, ...], ref_affine: np.ndarray) -> np.ndarray:
        """Nearest-neighbour pull onto a RAS grid: each voxel centre takes the pixel of the nearest frame
        (within half the local frame spacing) nearest to it in that frame's plane."""
        ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
        lps_affine = ras_to_lps @ np.asarray(ref_affine, dtype=np.float64)
        out = np.zeros(tuple(ref_shape[:3]), dtype=np.uint8)
        n, rows, cols = self.frames.shape
        lo, hi = self.lo, self.hi
        ii, jj = np.meshgrid(np.arange(ref_shape[0]), np.arange(ref_shape[1]), indexing="ij")
        for k in range(ref_shape[2]):
            ijk = np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k)], axis=1).astype(np.float64)
            p = nib_apply(lps_affine, ijk)
            t = p @ self.normal
            f = np.clip(np.searchsorted(self.t, t), 0, n - 1)
            f_prev = np.clip(f - 1, 0, n - 1)
            f = np.where(np.abs(self.t[f_prev] - t) < np.abs(self.t[f] - t), f_prev, f)
            inside = (t >= lo[f]) & (t < hi[f])
            d = p - self.origins[f]
            c = np.rint(d @ self.row_dir / self.spacing[1]).astype(np.int64)
            r = np.rint(d @ self.col_dir / self.spacing[0]).astype(np.int64)
            inside &= (c >= 0) & (c < cols) & (r >= 0) & (r < rows)
            vals = np.zeros(ii.size, dtype=np.uint8)
            vals[inside] = self.frames[f[inside], r[inside], c[inside]]
            out[:, :, k] = vals.reshape(ii.shape)
        return (out > 0).astype(np.uint8)


def _segment_number(segments: list[tuple[int, str]], which: str, labels: dict[str, int], label_map: bool) -> int:
    """The segment for ``which``: the one segment of a single-segment SEG named in one column; else the
    segment labelled IPH/IVH (or its long name), else the one numbered ``labels[which]``."""
    names = {"iph": ("iph", "intraparenchymal", "intracerebral", "ich"), "ivh": ("ivh", "intraventricular")}[which]
    if len(segments) == 1 and not label_map:
        return segments[0][0]
    for number, label in segments:
        words = label.lower().replace("_", " ").replace("-", " ").split()
        if any(w in names for w in words) or any(label.lower().startswith(n) for n in names[1:]):
            return number
    for number, _ in segments:
        if number == labels.get(which):
            return number
    found = ", ".join(f"{n}: {label!r}" for n, label in segments)
    raise MaskFormatError(f"no segment named {which.upper()} (or numbered {labels.get(which)}) among the SEG's "
                          f"segments ({found})")


def read_seg(path: str | Path, patient_id: str, what: str, which: str, labels: dict[str, int],
             label_map: bool) -> SegFrames:
    """The IPH or IVH segment of a DICOM SEG file as :class:`SegFrames`; every problem is a
    :class:`PatientInputError` naming patient, file and problem."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(str(path))
    except Exception as err:  # noqa: BLE001 - any failure to parse is "not a readable SEG"
        raise PatientInputError(patient_id, path, f"{what}: not a NIfTI file and not a readable DICOM SEG "
                                f"({type(err).__name__}: {str(err)[:120]})") from err
    try:
        segments = [(int(s.SegmentNumber), str(getattr(s, "SegmentLabel", ""))) for s in seg.SegmentSequence]
        number = _segment_number(segments, which, labels, label_map)
        shared = seg.SharedFunctionalGroupsSequence[0]
        iop = np.asarray([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
        spacing = tuple(float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
        pixels = np.asarray(seg.pixel_array)
        if pixels.ndim == 2:
            pixels = pixels[None]
        frames, origins, every_t = [], [], []
        normal = np.cross(iop[:3], iop[3:])
        for k, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
            position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
            every_t.append(float(np.dot(position, normal)))
            ident = group if "SegmentIdentificationSequence" in group else shared
            if int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber) != number:
                continue
            origins.append(position)
            frame = pixels[k]
            if str(seg.SegmentationType) == "FRACTIONAL":
                frame = frame > 0.5 * float(seg.MaximumFractionalValue)
            frames.append(np.asarray(frame > 0, dtype=np.uint8))
        if not frames:
            raise MaskFormatError(f"segment {number} has no frames (an empty segment)")
        distinct = np.diff(np.unique(np.round(every_t, 3)))
        distinct = distinct[distinct > 1e-3]
        thickness = getattr(shared.PixelMeasuresSequence[0], "SpacingBetweenSlices", None) or getattr(
            shared.PixelMeasuresSequence[0], "SliceThickness", None)
        nominal = float(distinct.min()) if len(distinct) else float(thickness or min(spacing))
        return SegFrames(np.stack(frames), np.asarray(origins), iop, spacing, nominal)
    except (AttributeError, IndexError, KeyError, ValueError) as err:
        if isinstance(err, MaskFormatError):
            raise PatientInputError(patient_id, path, f"{what}: {err}") from err
        raise PatientInputError(patient_id, path, f"{what}: DICOM SEG without usable plane geometry "
                                f"({type(err).__name__}: {str(err)[:120]})") from err
