"""DICOM folder -> one axial CT volume in HU with exact geometry, without personal data.

Why by hand: SimpleITK's ``ImageSeriesReader`` (and nibabel) assume an orthogonal, evenly spaced
stack, so a gantry-tilted or unevenly spaced series comes out with silently wrong geometry, and
dcm2niix is a command-line tool rather than a Python dependency. pydicom reads headers and pixels
(SimpleITK/GDCM decodes compressed transfer syntaxes pydicom has no plugin for); the stacking,
tilt correction and resampling below follow dcm2niix's approach.

Series selection rule (:func:`select_series`), applied to every stack in the folder (a stack = one
SeriesInstanceUID with one orientation, matrix and pixel spacing):

1. usable: Modality CT, SOP class CT Image Storage, ImageType without LOCALIZER/SCOUT, single-frame,
   geometry tags present, image normal within ``MAX_AXIAL_DEG`` of the scanner z axis (so gantry
   tilts up to that angle pass), at least ``MIN_SLICES`` slices;
2. among usable stacks: most slices, then smallest slice spacing (the thinnest reconstruction),
   then lowest series number. The reconstruction kernel is deliberately not a criterion.

De-identification: only the fields of :class:`SeriesInfo` (series number/description, modality,
geometry, kernel) leave this module; personal attributes (names, dates, IDs, institution) are never
read into any returned object or log line. Headers for selection are read with
``specific_tags`` so personal attributes are not even parsed until the pixel read.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from scipy import ndimage

from hemexp.core.errors import PatientInputError

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
MAX_AXIAL_DEG = 35.0  # image normal vs scanner z: beyond this the stack is coronal/sagittal/oblique MPR
MIN_SLICES = 3
AIR_HU = -1024.0  # fill value for voxels a tilt correction moves outside the acquired field of view
SHIFT_TOL_PX = 0.01  # in-plane slice offsets below this are float noise, not tilt
SPACING_RTOL = 0.01  # slice gaps within 1 % of the median count as even
GAP_WARN, GAP_MAX = 1.5, 4.0  # gap / median spacing: warn above the first, refuse above the second
HEADER_TAGS = [
    "SOPClassUID", "Modality", "ImageType", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
    "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns",
    "SliceThickness", "ConvolutionKernel", "InstanceNumber", "NumberOfFrames",
]


@dataclasses.dataclass(frozen=True)
class SeriesInfo:
    """The only description of a series that may leave this module (no personal attributes)."""

    series_number: int | None
    series_description: str
    modality: str
    n_slices: int
    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float]  # (between rows, between columns), as in DICOM
    slice_spacing_mm: float | None  # median distance between slice planes along the normal
    spacing_uniform: bool
    tilt_deg: float  # angle between the slice stacking direction and the image normal (gantry tilt)
    axial_deg: float | None  # angle between the image normal and the scanner z axis
    slice_thickness_mm: float | None
    kernel: str
    localizer: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class DicomStack:
    """Files of one stack with the geometry needed to order and place them."""

    uid: str  # grouping key only; never returned or logged
    sop_class: str
    image_type: tuple[str, ...]
    multiframe: bool
    orientation: np.ndarray | None  # 6 direction cosines (row direction, column direction), LPS
    pixel_spacing: tuple[float, float]
    files: list[Path]
    positions: list[np.ndarray | None]
    info_fields: dict

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.orientation[:3], self.orientation[3:])
        return n / np.linalg.norm(n)

    def sorted_offsets(self) -> tuple[np.ndarray, np.ndarray]:
        """(order, positions along the normal relative to the first slice), ascending."""
        pos = np.array(self.positions, dtype=np.float64)
        t = pos @ self.normal
        order = np.argsort(t, kind="stable")
        return order, t[order] - t[order[0]]

    def info(self) -> SeriesInfo:
        f = self.info_fields
        spacing, uniform, tilt, axial = None, True, 0.0, None
        if self.orientation is not None and all(p is not None for p in self.positions):
            axial = float(np.degrees(np.arccos(min(1.0, abs(self.normal[2])))))
            if len(self.files) > 1:
                order, t = self.sorted_offsets()
                gaps = np.diff(t)
                spacing = float(np.median(gaps))
                uniform = bool(np.all(np.abs(gaps - spacing) <= SPACING_RTOL * spacing + 1e-3))
                pos = np.array(self.positions)[order]
                d = pos[-1] - pos[0]
                if np.linalg.norm(d) > 0:
                    cos = abs(d @ self.normal) / np.linalg.norm(d)
                    tilt = float(np.degrees(np.arccos(min(1.0, cos))))
        return SeriesInfo(
            series_number=f["number"], series_description=f["description"], modality=f["modality"],
            n_slices=len(self.files), rows=f["rows"], columns=f["columns"],
            pixel_spacing_mm=self.pixel_spacing, slice_spacing_mm=spacing, spacing_uniform=uniform,
            tilt_deg=round(tilt, 3), axial_deg=None if axial is None else round(axial, 3),
            slice_thickness_mm=f["thickness"], kernel=f["kernel"], localizer=_is_localizer(self.image_type),
        )


def _is_localizer(image_type: tuple[str, ...]) -> bool:
    return any(v.upper() in ("LOCALIZER", "SCOUT") for v in image_type)


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _float_or_none(value) -> float | None:
    got = _floats([value], 1)
    return None if got is None else got[0]


def _read_header(path: Path, patient_id: str) -> pydicom.Dataset | None:
    """Selected tags of one file; None for files that are not DICOM images (notes, DICOMDIR)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except InvalidDicomError:
        return None
    except Exception as err:  # pydicom raises many types for a damaged file; all mean "corrupt"
        raise PatientInputError(patient_id, path, f"truncated or corrupt DICOM file ({type(err).__name__}: {err})") from err
    if "SOPClassUID" in ds:
        return ds
    if ds.file_meta.get("MediaStorageSOPClassUID") == MEDIA_DIRECTORY:
        return None  # DICOMDIR index, not an image
    # The file announced itself as DICOM (preamble + 'DICM') but holds no SOP class: cut short.
    raise PatientInputError(patient_id, path, "truncated or corrupt DICOM file (header ends before SOPClassUID)")


def scan_folder(folder: str | Path, patient_id: str) -> list[DicomStack]:
    """Group every DICOM image under ``folder`` (recursively) into stacks."""
    folder = Path(folder)
    if not folder.exists():
        raise PatientInputError(patient_id, folder, "DICOM folder not found")
    groups: dict[tuple, DicomStack] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        ds = _read_header(path, patient_id)
        if ds is None:
            continue
        iop = _floats(ds.get("ImageOrientationPatient"), 6)
        ps = _floats(ds.get("PixelSpacing"), 2) or (0.0, 0.0)
        key = (str(ds.get("SeriesInstanceUID", "")), None if iop is None else tuple(np.round(iop, 4)),
               int(ds.get("Rows", 0)), int(ds.get("Columns", 0)), tuple(np.round(ps, 5)))
        if key not in groups:
            number = ds.get("SeriesNumber")
            groups[key] = DicomStack(
                uid=key[0], sop_class=str(ds.get("SOPClassUID", "")),
                image_type=tuple(str(v) for v in (ds.get("ImageType") or [])),
                multiframe=int(ds.get("NumberOfFrames", 1) or 1) > 1,
                orientation=None if iop is None else np.array(iop), pixel_spacing=(ps[0], ps[1]),
                files=[], positions=[],
                info_fields={
                    "number": None if number in (None, "") else int(number),
                    "description": str(ds.get("SeriesDescription", "")),
                    "modality": str(ds.get("Modality", "")),
                    "rows": int(ds.get("Rows", 0)), "columns": int(ds.get("Columns", 0)),
                    "thickness": _float_or_none(ds.get("SliceThickness")),
                    "kernel": "\\".join(str(v) for v in np.atleast_1d(ds.get("ConvolutionKernel", ""))),
                },
            )
        ipp = _floats(ds.get("ImagePositionPatient"), 3)
        groups[key].files.append(path)
        groups[key].positions.append(None if ipp is None else np.array(ipp))
    return list(groups.values())


def rejection(stack: DicomStack) -> str | None:
    """Why a stack cannot be the CT volume, or None when it is usable."""
    info = stack.info_fields
    if info["modality"].upper() != "CT":
        return f"modality {info['modality'] or 'missing'}, not CT"
    if stack.sop_class != CT_IMAGE_STORAGE:
        return f"SOP class {stack.sop_class} is not CT Image Storage (secondary capture, report or enhanced CT)"
    if _is_localizer(stack.image_type):
        return "localizer (scout) image"
    if stack.multiframe:
        return "multi-frame image (not supported)"
    if stack.orientation is None or any(p is None for p in stack.positions) or 0.0 in stack.pixel_spacing:
        return "geometry tags missing (ImageOrientationPatient/ImagePositionPatient/PixelSpacing)"
    axial = stack.info().axial_deg
    if axial > MAX_AXIAL_DEG:
        return f"not axial (image normal {axial:.0f} deg from the scanner z axis)"
    if len(stack.files) < MIN_SLICES:
        return f"only {len(stack.files)} slice(s)"
    return None


def _label(info: SeriesInfo) -> str:
    return f"series {info.series_number} '{info.series_description}'"


def series_info(folder: str | Path, patient_id: str) -> list[dict]:
    """Safe description of every stack in ``folder``: :class:`SeriesInfo` fields plus ``rejected``
    (the reason, or None) and ``chosen`` (True for the stack :func:`select_series` picks)."""
    stacks = scan_folder(folder, patient_id)
    chosen = _best(stacks)
    return [{**s.info().to_dict(), "rejected": rejection(s), "chosen": s is chosen} for s in stacks]


def _best(stacks: list[DicomStack]) -> DicomStack | None:
    usable = [s for s in stacks if rejection(s) is None]
    if not usable:
        return None

    def rank(s: DicomStack) -> tuple:
        info = s.info()
        return (-info.n_slices, info.slice_spacing_mm, info.series_number if info.series_number is not None else 1 << 30)

    return min(usable, key=rank)


def select_series(stacks: list[DicomStack], folder: Path, patient_id: str) -> tuple[DicomStack, str]:
    """Apply the module's selection rule; raise a PatientInputError that says why nothing fits."""
    if not stacks:
        raise PatientInputError(patient_id, folder, "no DICOM image files found in folder")
    chosen = _best(stacks)
    if chosen is None:
        modalities = {s.info_fields["modality"].upper() for s in stacks}
        if "CT" not in modalities:
            raise PatientInputError(patient_id, folder, f"non-CT modality ({', '.join(sorted(modalities))}); a CT series is required")
        ct = [s for s in stacks if s.info_fields["modality"].upper() == "CT"]
        if all(_is_localizer(s.image_type) for s in ct):
            raise PatientInputError(patient_id, folder, "folder holds only localizer (scout) images, no axial CT series")
        reasons = "; ".join(f"{_label(s.info())}: {rejection(s)}" for s in stacks)
        raise PatientInputError(patient_id, folder, f"no usable axial CT series ({reasons})")
    info = chosen.info()
    others = len(stacks) - 1
    reason = (f"{info.n_slices} axial CT slices at {info.slice_spacing_mm:.2f} mm"
              f" (most slices, then thinnest, among {others + 1} stack(s); {others} not chosen)")
    return chosen, reason


def _read_pixels(path: Path, stack: DicomStack, patient_id: str) -> np.ndarray:
    """HU pixels (rows, columns) of one file: RescaleSlope/Intercept (modality LUT) applied."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:
        raise PatientInputError(patient_id, path, f"truncated or corrupt DICOM file ({type(err).__name__}: {err})") from err
    shape = (stack.info_fields["rows"], stack.info_fields["columns"])
    try:
        hu = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    except Exception as err:
        if not ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian).is_compressed:
            raise PatientInputError(patient_id, path, f"truncated or corrupt DICOM file: pixel data unreadable ({type(err).__name__}: {err})") from err
        hu = _read_pixels_sitk(path, patient_id, err)
    if hu.shape != shape:
        raise PatientInputError(patient_id, path, f"pixel data shape {hu.shape} does not match Rows x Columns {shape}")
    return hu


def _read_pixels_sitk(path: Path, patient_id: str, first_err: Exception) -> np.ndarray:
    """Decode a compressed transfer syntax pydicom has no plugin for (GDCM applies the rescale)."""
    import SimpleITK as sitk

    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32))[0]
    except RuntimeError as err:
        raise PatientInputError(
            patient_id, path, f"cannot decode compressed pixel data (pydicom: {first_err}; SimpleITK: {err})"
        ) from err


def _regular_grid(slices: np.ndarray, t: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, float, np.ndarray, list[str]]:
    """Resample a sheared / unevenly spaced stack onto a regular orthogonal grid.

    ``slices`` (n, rows, cols) sorted along the normal; ``t`` their positions along it (mm, from 0);
    ``uv`` (n, 2) in-plane offset of each slice origin in pixels (column index, row index) relative
    to the first slice. Each slice is first shifted in its own plane so the origins line up on the
    normal (gantry tilt; the grid grows to keep every acquired pixel), then planes are interpolated
    linearly to an even spacing (the median gap). Returns (stack, spacing, grid origin offset in
    pixels (col, row), warnings).
    """
    warnings: list[str] = []
    gaps = np.diff(t)
    if np.any(gaps <= 1e-3):
        raise ValueError(f"{int(np.sum(gaps <= 1e-3))} duplicate slice position(s)")
    median = float(np.median(gaps))
    if gaps.max() > GAP_MAX * median:
        raise ValueError(f"gap of {gaps.max():.1f} mm between slices (median {median:.2f} mm): slices missing")
    if gaps.max() > GAP_WARN * median:
        warnings.append(f"slice gap of {gaps.max():.2f} mm (median {median:.2f} mm) filled by interpolation")
    origin = np.zeros(2)
    if np.abs(uv).max() > SHIFT_TOL_PX:
        origin = uv.min(axis=0)
        extent = np.ceil(uv.max(axis=0) - origin - SHIFT_TOL_PX).astype(int)
        out_shape = (slices.shape[1] + extent[1], slices.shape[2] + extent[0])
        slices = np.stack([
            ndimage.affine_transform(s, np.eye(2), offset=(origin[1] - o[1], origin[0] - o[0]),
                                     output_shape=out_shape, order=1, cval=AIR_HU)
            for s, o in zip(slices, uv, strict=True)
        ])
        warnings.append(f"gantry tilt corrected: slices shifted in-plane by up to {np.abs(uv).max():.1f} pixels")
    if np.all(np.abs(gaps - median) <= SPACING_RTOL * median + 1e-3):
        return slices, float(t[-1] / (len(t) - 1)), origin, warnings
    n_out = int(np.floor(t[-1] / median + 1e-6)) + 1
    tau = np.arange(n_out) * median
    k = np.clip(np.searchsorted(t, tau, side="right") - 1, 0, len(t) - 2)
    w = ((tau - t[k]) / (t[k + 1] - t[k])).astype(np.float32)[:, None, None]
    warnings.append(f"uneven slice spacing resampled to {median:.3f} mm ({len(t)} -> {n_out} slices)")
    return (1 - w) * slices[k] + w * slices[k + 1], median, origin, warnings


def read_stack(stack: DicomStack, patient_id: str, folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(float32 HU array indexed (column, row, slice), 4x4 RAS affine, warnings) for one stack."""
    order, t = stack.sorted_offsets()
    files = [stack.files[i] for i in order]
    pos = np.array([stack.positions[i] for i in order])
    row_dir, col_dir, normal = stack.orientation[:3], stack.orientation[3:], stack.normal
    d_row, d_col = stack.pixel_spacing  # distance between rows (along col_dir), between columns
    slices = np.stack([_read_pixels(f, stack, patient_id) for f in files])
    off = pos - pos[0]
    uv = np.stack([off @ row_dir / d_col, off @ col_dir / d_row], axis=1)
    try:
        slices, d_slice, origin, warnings = _regular_grid(slices, t, uv)
    except ValueError as err:
        raise PatientInputError(patient_id, folder, f"{_label(stack.info())}: {err}") from err
    lps = np.eye(4)
    lps[:3, 0] = row_dir * d_col
    lps[:3, 1] = col_dir * d_row
    lps[:3, 2] = normal * d_slice
    lps[:3, 3] = pos[0] + origin[0] * d_col * row_dir + origin[1] * d_row * col_dir
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM patient space is LPS, NIfTI world is RAS
    return np.ascontiguousarray(slices.transpose(2, 1, 0), dtype=np.float32), ras, warnings


def load_dicom_folder(folder: str | Path, patient_id: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Pick the axial CT series in ``folder`` and return (HU array, RAS affine, safe info dict).

    The info dict holds the chosen series' :class:`SeriesInfo`, ``selection_reason``,
    ``n_stacks_in_folder`` and ``warnings``; the choice is logged with series number/description only.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PatientInputError(patient_id, folder, "expected a DICOM folder or a NIfTI file")
    stacks = scan_folder(folder, patient_id)
    stack, reason = select_series(stacks, folder, patient_id)
    info = stack.info()
    data, affine, warnings = read_stack(stack, patient_id, folder)
    log.info("patient %s: using %s: %s", patient_id, _label(info), reason)
    for w in warnings:
        log.info("patient %s: %s: %s", patient_id, _label(info), w)
    out = {**info.to_dict(), "selection_reason": reason, "n_stacks_in_folder": len(stacks), "warnings": warnings}
    by_reason: dict[str, int] = defaultdict(int)
    for s in stacks:
        if s is not stack:
            by_reason[rejection(s) or "usable, ranked lower"] += 1
    out["not_chosen"] = dict(by_reason)
    return data, affine, out
