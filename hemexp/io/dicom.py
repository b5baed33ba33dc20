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
2. among usable stacks: the soft-tissue reconstruction first (:func:`kernel_class`: ConvolutionKernel,
   then ImageType and SeriesDescription hints; a bone/lung/sharp kernel is ranked last, an unknown
   kernel in between), then most slices, then smallest slice spacing (the thinnest reconstruction),
   then lowest series number. The reason is returned as a fixed phrase (never the free-text
   description), e.g. "soft-tissue kernel preferred over 1 bone-kernel series".
3. a folder whose usable stacks belong to two patients (PatientID differs; compared in memory, never
   stored), or two usable series that tie on every criterion, is refused: "two series" in one folder
   is a copy mistake, and picking one would only surface later as a mask-grid mismatch.

Slice checks (:func:`read_stack`): a slice whose pixels are far from both neighbours where those agree
(garbage: constant or random data) is replaced by interpolation between its neighbours, at a stack
end refused; a slice of the chosen series with another matrix, pixel spacing or orientation is
dropped and its place interpolated (the regular grid is kept). Both are recorded in ``warnings``.

De-identification (``docs/deidentification.md``): only the fields of :class:`SeriesInfo` (series
number, modality as a defined term, geometry, kernel as a vendor code or "other") leave this module;
personal attributes (names, dates, IDs, institution) and free text (SeriesDescription) are never put
into any returned object, message or log line. Headers for selection are read with ``specific_tags``
(:data:`HEADER_TAGS`, within :data:`hemexp.core.deid.DICOM_READ_ATTRIBUTES`) so other attributes are
not even parsed until the pixel read.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from scipy import ndimage

from hemexp.core.deid import kernel_code, modality_term, standard_uid
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
    "SliceThickness", "ConvolutionKernel", "InstanceNumber", "NumberOfFrames", "PatientID",
]
# Garbage-slice test (see _garbage_slices): where both neighbours agree within AGREE_HU, a slice
# deviating by more than DEVIATE_HU on more than GARBAGE_FRACTION of those pixels is not anatomy.
AGREE_HU, DEVIATE_HU, GARBAGE_FRACTION = 100.0, 300.0, 0.10
MIN_AGREE = 0.5  # neighbours must agree on at least this share of the pixels for a verdict
MAX_REPAIRED_SLICES = 2

# Reconstruction-kernel classes (ConvolutionKernel values, upper-cased): soft-tissue kernels are
# what hemorrhage is read (and segmented) on; bone/lung/sharp kernels amplify noise.
KERNEL_RANK = {"soft": 0, "unknown": 1, "bone": 2, "lung": 2, "sharp": 2}
_SOFT_WORDS = ("STANDARD", "STND", "STD", "SOFT", "BRAIN", "SMOOTH", "CEREBRUM", "NEURO", "PARENCHYMA")
_BONE_WORDS = ("BONE", "EDGE", "DETAIL", "SHARP", "OSSEOUS")
_LUNG_WORDS = ("LUNG", "CHEST", "PULM")
_SHORT_CODES = {"UA": "soft", "UB": "soft", "UC": "soft", "D": "bone", "E": "bone", "YC": "bone", "YD": "bone",
                "YE": "bone", "L": "lung"}  # Philips
_SIEMENS_KERNEL = re.compile(r"^([A-Z])([A-Z]?)(\d{2})([A-Z]?)$")  # H30s, Hr38, Br64, J40s, Qr40 (upper-cased)
_CANON_KERNEL = re.compile(r"^FC(\d{2})$")  # Canon/Toshiba FC21, FC26 (brain), FC30+ (bone)


@dataclasses.dataclass(frozen=True)
class SeriesInfo:
    """The only description of a series that may leave this module (no personal attributes)."""

    series_number: int | None
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
    # Salted in-process hash of PatientID (None when absent): only compared, to tell two patients'
    # series apart; never stored, returned or logged.
    subject: int | None = None

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
            series_number=f["number"], modality=modality_term(f["modality"]),
            n_slices=len(self.files), rows=f["rows"], columns=f["columns"],
            pixel_spacing_mm=self.pixel_spacing, slice_spacing_mm=spacing, spacing_uniform=uniform,
            tilt_deg=round(tilt, 3), axial_deg=None if axial is None else round(axial, 3),
            slice_thickness_mm=f["thickness"], kernel=kernel_code(f["kernel"]), localizer=_is_localizer(self.image_type),
        )


def _words_class(text: str) -> str:
    words = [w for w in re.split(r"[^A-Z0-9]+", text.upper()) if w]
    for cls, vocab in (("lung", _LUNG_WORDS), ("bone", _BONE_WORDS), ("soft", _SOFT_WORDS)):
        if any(w.startswith(v) for w in words for v in vocab):
            return cls
    return "unknown"


def kernel_class(kernel: str, image_type: tuple[str, ...] = (), description: str = "") -> str:
    """'soft', 'bone', 'lung', 'sharp' or 'unknown' for a reconstruction.

    ConvolutionKernel decides when it is recognised: GE words (STANDARD/SOFT vs BONE/BONEPLUS/LUNG/
    EDGE/DETAIL), Siemens codes (H30s/Hr38/J40s: number <= 45 soft; H70h/Br64: >= 60 sharp, 'l' as
    second letter lung), Canon FC2x soft / FC3x+ bone, Philips UA/UB/UC soft, D/E/YC/YD bone, L lung.
    Otherwise ImageType, then SeriesDescription words are hints (the description is only read here,
    never stored). Only the class name leaves this function.
    """
    for value in re.split(r"[\\/,]+", kernel.upper()):
        value = value.strip()
        if not value:
            continue
        if value in _SHORT_CODES:
            return _SHORT_CODES[value]
        m = _CANON_KERNEL.match(value)
        if m:
            return "soft" if int(m.group(1)) < 30 else "bone"
        m = _SIEMENS_KERNEL.match(value)
        if m:
            if m.group(2) == "L":
                return "lung"
            number = int(m.group(3))
            return "soft" if number <= 45 else "sharp" if number >= 60 else "unknown"
        cls = _words_class(value)
        if cls != "unknown":
            return cls
    for text in (" ".join(image_type[2:]), description):  # ImageType values 3+ are vendor-specific hints
        cls = _words_class(text)
        if cls != "unknown":
            return cls
    return "unknown"


def _kernel_of(stack: DicomStack) -> str:
    f = stack.info_fields
    return kernel_class(f["kernel"], stack.image_type, f["description"])


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


_MIXED_SUBJECTS = -1


def _subject(ds: pydicom.Dataset) -> int | None:
    value = str(ds.get("PatientID", "") or "").strip()
    return hash(("hemexp-subject", value)) if value else None


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
                subject=_subject(ds),
            )
        elif groups[key].subject != _subject(ds):
            groups[key].subject = _MIXED_SUBJECTS
        ipp = _floats(ds.get("ImagePositionPatient"), 3)
        groups[key].files.append(path)
        groups[key].positions.append(None if ipp is None else np.array(ipp))
    return list(groups.values())


def rejection(stack: DicomStack) -> str | None:
    """Why a stack cannot be the CT volume, or None when it is usable."""
    info = stack.info_fields
    if info["modality"].upper() != "CT":
        return f"modality {modality_term(info['modality']) or 'missing'}, not CT"
    if stack.sop_class != CT_IMAGE_STORAGE:
        return f"SOP class {standard_uid(stack.sop_class)} is not CT Image Storage (secondary capture, report or enhanced CT)"
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
    return f"series {info.series_number}"  # never the free-text SeriesDescription (docs/deidentification.md)


def series_info(folder: str | Path, patient_id: str) -> list[dict]:
    """Safe description of every stack in ``folder``: :class:`SeriesInfo` fields plus ``rejected``
    (the reason, or None) and ``chosen`` (True for the stack :func:`select_series` picks)."""
    stacks = scan_folder(folder, patient_id)
    chosen = _best(stacks)
    return [{**s.info().to_dict(), "rejected": rejection(s), "chosen": s is chosen} for s in stacks]


def _rank(s: DicomStack) -> tuple:
    info = s.info()
    return (KERNEL_RANK[_kernel_of(s)], -info.n_slices, round(info.slice_spacing_mm, 3),
            info.series_number if info.series_number is not None else 1 << 30)


def _best(stacks: list[DicomStack]) -> DicomStack | None:
    usable = [s for s in stacks if rejection(s) is None]
    return min(usable, key=_rank) if usable else None


def _grid_label(s: DicomStack) -> str:
    """Series number and grid of a stack (no free text), for messages about mixed folders."""
    f = s.info_fields
    return f"series {f['number']} ({f['columns']}x{f['rows']}x{len(s.files)}, {_kernel_of(s)} kernel)"


def usable_series(stacks: list[DicomStack]) -> list[dict]:
    """Safe summary of every usable stack (series number, kernel class, grid as (columns, rows,
    slices) before canonicalisation): what a mask-grid mismatch message compares against."""
    return [{"series_number": s.info_fields["number"], "kernel_class": _kernel_of(s),
             "grid": [s.info_fields["columns"], s.info_fields["rows"], len(s.files)]}
            for s in sorted((s for s in stacks if rejection(s) is None), key=_rank)]


def _mixed_folder_problem(stacks: list[DicomStack], chosen: DicomStack) -> str | None:
    """Two patients, or two equally good series, in one folder (see the module docstring, rule 3)."""
    usable = [s for s in stacks if rejection(s) is None]
    subjects = {s.subject for s in usable if s.subject is not None}
    if _MIXED_SUBJECTS in subjects or len(subjects) > 1:
        n = len(subjects - {_MIXED_SUBJECTS}) or 2
        return (f"two series of different patients in one folder ({n} distinct PatientIDs among "
                f"{', '.join(_grid_label(s) for s in usable)}): keep one patient's scan per folder")
    ties = [s for s in usable if s is not chosen and s.uid != chosen.uid and _rank(s)[:3] == _rank(chosen)[:3]]
    if ties:
        return (f"two series in one folder that fit equally well ({_grid_label(chosen)} and "
                f"{', '.join(_grid_label(s) for s in ties)}: same kernel type, slice count and spacing), so the "
                "one the masks were drawn on cannot be told: keep one series per folder")
    return None


def select_series(stacks: list[DicomStack], folder: Path, patient_id: str) -> tuple[DicomStack, str]:
    """Apply the module's selection rule; raise a PatientInputError that says why nothing fits."""
    if not stacks:
        raise PatientInputError(patient_id, folder, "no DICOM image files found in folder")
    chosen = _best(stacks)
    if chosen is None:
        modalities = {modality_term(s.info_fields["modality"]) for s in stacks}
        if "CT" not in modalities:
            raise PatientInputError(patient_id, folder, f"non-CT modality ({', '.join(sorted(modalities))}); a CT series is required")
        ct = [s for s in stacks if s.info_fields["modality"].upper() == "CT"]
        if all(_is_localizer(s.image_type) for s in ct):
            raise PatientInputError(patient_id, folder, "folder holds only localizer (scout) images, no axial CT series")
        reasons = "; ".join(f"{_label(s.info())}: {rejection(s)}" for s in stacks)
        raise PatientInputError(patient_id, folder, f"no usable axial CT series ({reasons})")
    mixed = _mixed_folder_problem(stacks, chosen)
    if mixed:
        raise PatientInputError(patient_id, folder, mixed)
    info = chosen.info()
    others = len(stacks) - 1
    reason = (f"{info.n_slices} axial CT slices at {info.slice_spacing_mm:.2f} mm"
              f" (soft-tissue kernel first, then most slices, then thinnest, among {others + 1} stack(s); "
              f"{others} not chosen)")
    mine = KERNEL_RANK[_kernel_of(chosen)]
    worse: dict[str, int] = defaultdict(int)
    for s in stacks:
        if s is not chosen and rejection(s) is None and KERNEL_RANK[_kernel_of(s)] > mine:
            worse[_kernel_of(s)] += 1
    if worse:
        cls = "soft-tissue" if _kernel_of(chosen) == "soft" else f"{_kernel_of(chosen)}"
        reason += (f"; {cls} kernel preferred over "
                   + ", ".join(f"{n} {k}-kernel series" for k, n in sorted(worse.items())))
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


def _garbage_fraction(s: np.ndarray, a: np.ndarray, b: np.ndarray, expected: np.ndarray) -> float:
    """Share of the pixels where ``a`` and ``b`` agree on which ``s`` is far from ``expected``."""
    agree = np.abs(a - b) <= AGREE_HU
    n = int(agree.sum())
    if n < MIN_AGREE * agree.size:  # the neighbours themselves differ (noise, not a smooth stack): no verdict
        return 0.0
    return float(np.count_nonzero(agree & (np.abs(s - expected) > DEVIATE_HU))) / n


def garbage_slices(slices: np.ndarray) -> list[tuple[int, float]]:
    """(index, fraction) of slices whose pixel data cannot be anatomy: where both neighbours agree
    (within ``AGREE_HU``, on at least ``MIN_AGREE`` of the slice), more than ``GARBAGE_FRACTION`` of the pixels deviate from their mean by more
    than ``DEVIATE_HU`` (a constant or random slice between two similar ones). A stack end, and a slice
    tested across one more step (two adjacent broken slices), needs a three times larger fraction:
    anatomy changes fastest at the ends, and interpolation across three steps misses real anatomy."""
    n = len(slices)
    if n < 4:
        return []
    out = []
    for k in range(n):
        if 0 < k < n - 1:
            # the two neighbours at GARBAGE_FRACTION; one step further on either side (two adjacent broken
            # slices) at a three times stricter fraction, because interpolating across 3 slice steps of
            # thick slices misses real anatomy (skull base, vertex) by more than DEVIATE_HU on ~10 %
            # of the pixels (a synthetic 5 mm head did: 0.3 % against its neighbours, 11 % across 3 steps)
            pairs = [(i, j) for i, j in ((k - 1, k + 1), (k - 1, k + 2), (k - 2, k + 1)) if i >= 0 and j < n]
            tests = [(_garbage_fraction(slices[k], slices[i], slices[j],
                                        slices[i] + (slices[j] - slices[i]) * ((k - i) / (j - i))),
                      GARBAGE_FRACTION if j - i == 2 else 3 * GARBAGE_FRACTION) for i, j in pairs]
        else:
            a, b = (slices[1], slices[2]) if k == 0 else (slices[-2], slices[-3])
            tests = [(_garbage_fraction(slices[k], a, b, a), 3 * GARBAGE_FRACTION)]
        failed = [frac for frac, limit in tests if frac > limit]
        if failed:
            out.append((k, max(failed)))
    return out


def _repair_garbage(slices: np.ndarray, t: np.ndarray, label: str, patient_id: str, folder: Path,
                    files: list[Path]) -> list[str]:
    """Replace isolated garbage interior slices (in place) by interpolation; refuse the rest."""
    bad = garbage_slices(slices)
    if not bad:
        return []
    n = len(slices)
    idx = [k for k, _ in bad]
    desc = ", ".join(f"slice {k + 1} of {n} ({files[k].name}: {100 * f:.0f} % of pixels far from both neighbours)"
                     for k, f in bad)
    if len(bad) > MAX_REPAIRED_SLICES or any(b - a == 1 for a, b in zip(idx, idx[1:], strict=False)):
        raise PatientInputError(patient_id, folder, f"{label}: {len(bad)} slices with implausible pixel data "
                                f"(garbage, not anatomy): {desc}; too many or adjacent to repair: re-export the series")
    if idx[0] == 0 or idx[-1] == n - 1:
        raise PatientInputError(patient_id, folder, f"{label}: implausible pixel data at the end of the stack: {desc}; "
                                "an end slice cannot be interpolated: re-export the series")
    for k in idx:
        w = np.float32((t[k] - t[k - 1]) / (t[k + 1] - t[k - 1]))
        slices[k] = (1 - w) * slices[k - 1] + w * slices[k + 1]
    return [f"{len(bad)} slice(s) with implausible pixel data (garbage, not anatomy) replaced by interpolation "
            f"from their neighbours: {desc}"]


def read_stack(stack: DicomStack, patient_id: str, folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(float32 HU array indexed (column, row, slice), 4x4 RAS affine, warnings) for one stack."""
    order, t = stack.sorted_offsets()
    files = [stack.files[i] for i in order]
    pos = np.array([stack.positions[i] for i in order])
    row_dir, col_dir, normal = stack.orientation[:3], stack.orientation[3:], stack.normal
    d_row, d_col = stack.pixel_spacing  # distance between rows (along col_dir), between columns
    slices = np.stack([_read_pixels(f, stack, patient_id) for f in files])
    label = f"series {stack.info_fields['number']}"
    repaired = _repair_garbage(slices, t, label, patient_id, folder, files)
    off = pos - pos[0]
    uv = np.stack([off @ row_dir / d_col, off @ col_dir / d_row], axis=1)
    try:
        slices, d_slice, origin, warnings = _regular_grid(slices, t, uv)
    except ValueError as err:
        raise PatientInputError(patient_id, folder, f"{label}: {err}") from err
    warnings = repaired + warnings
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
    ``n_stacks_in_folder`` and ``warnings``; the choice is logged with the series number only.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PatientInputError(patient_id, folder, "expected a DICOM folder or a NIfTI file")
    stacks = scan_folder(folder, patient_id)
    stack, reason = select_series(stacks, folder, patient_id)
    info = stack.info()
    data, affine, warnings = read_stack(stack, patient_id, folder)
    odd = [s for s in stacks if s is not stack and s.uid and s.uid == stack.uid and len(s.files) < MIN_SLICES]
    if odd:  # slices of this series on another matrix/spacing/orientation: left out, their place interpolated
        n_odd = sum(len(s.files) for s in odd)
        warnings.insert(0, f"{n_odd} slice(s) of this series with a different matrix, pixel spacing or orientation "
                        f"({', '.join(f.name for s in odd for f in s.files)}) dropped; the stack's regular grid is "
                        "kept and any gap filled by interpolation")
    log.info("patient %s: using %s: %s", patient_id, _label(info), reason)
    for w in warnings:
        log.info("patient %s: %s: %s", patient_id, _label(info), w)
    out = {**info.to_dict(), "selection_reason": reason, "kernel_class": _kernel_of(stack),
           "n_stacks_in_folder": len(stacks), "usable_series": usable_series(stacks), "warnings": warnings}
    by_reason: dict[str, int] = defaultdict(int)
    for s in stacks:
        if s is not stack:
            odd_slice = s.uid and s.uid == stack.uid and len(s.files) < MIN_SLICES
            by_reason["slice(s) of the chosen series on another matrix/orientation: dropped" if odd_slice
                      else rejection(s) or "usable, ranked lower"] += 1
    out["not_chosen"] = dict(by_reason)
    return data, affine, out
