"""Write a HU volume as a CT DICOM series (one file per axial slice) with exact geometry.

pydicom encodes every element; this module maps a nibabel-style voxel->RAS affine onto DICOM's LPS
geometry tags, which is the part every caller gets wrong in a different way. It is also the fixture
for DICOM-ingest tests: ``slice_positions_lps`` and ``orientation_lps`` override the geometry the
header declares (gantry tilt, uneven or shuffled slice spacing) while the pixels stay
``volume[:, :, k].T`` of slice ``k`` (rows = j, columns = i).

No personal data: PatientName is empty, PatientID is the pseudonymous ID, dates and birth data are
empty, and the header says the identity was removed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from hemexp.core.files import atomic_dir

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def affine_to_lps_geometry(affine: np.ndarray, n_slices: int) -> tuple[list[float], tuple[float, float], list[list[float]], float]:
    """(ImageOrientationPatient, PixelSpacing (row, column), ImagePositionPatient per slice, slice
    spacing) of a volume whose voxel (i, j, k) maps to RAS by ``affine``."""
    lps = LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64)
    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    dx, dy = float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step))
    orientation = [*(col_step / dx), *(row_step / dy)]
    positions = [list(lps[:3, 3] + k * slice_step) for k in range(n_slices)]
    return orientation, (dy, dx), positions, float(np.linalg.norm(slice_step))


def _ds(value: float) -> str:
    """Decimal String of at most 16 characters (DICOM DS limit), round-trippable to ~1e-6 mm."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text[:16]


def write_dicom_series(
    volume_hu: np.ndarray,
    affine: np.ndarray,
    out_dir: str | Path,
    patient_id: str,
    series_description: str,
    *,
    series_number: int = 1,
    slice_positions_lps: Sequence[Sequence[float]] | None = None,
    orientation_lps: Sequence[float] | None = None,
    slice_thickness_mm: float | None = None,
    gantry_tilt_deg: float = 0.0,
    uid_seed: str | None = None,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    kernel: str = "STANDARD",
    extra_tags: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``volume_hu`` (I x J x K, HU) as a CT Image Storage series in ``out_dir`` (atomically).

    ``affine`` is the nibabel voxel -> RAS mm matrix; from it come PixelSpacing, SliceThickness,
    ImageOrientationPatient and per-slice ImagePositionPatient unless overridden:
    ``slice_positions_lps`` (K positions, DICOM LPS mm) and/or ``orientation_lps`` (6 direction
    cosines). Stored values are ``round((HU - intercept) / slope)`` as int16; values that do not fit
    raise ``ValueError``. ``uid_seed`` makes every UID deterministic (same seed -> same UIDs);
    ``extra_tags`` (keyword -> value) are set last, e.g. to fake a localizer or another modality.
    Returns the written file paths (``IM0001.dcm`` ... in slice order).
    """
    vol = np.asarray(volume_hu)
    if vol.ndim != 3:
        raise ValueError(f"volume must be 3D (I, J, K), got shape {vol.shape}")
    stored = np.rint((vol.astype(np.float64) - rescale_intercept) / rescale_slope)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ValueError("HU values do not fit int16 with this rescale slope/intercept")
    stored = stored.astype(np.int16)
    n = vol.shape[2]
    orientation, spacing, positions, step = affine_to_lps_geometry(affine, n)
    if orientation_lps is not None:
        orientation = [float(v) for v in orientation_lps]
    if slice_positions_lps is not None:
        if len(slice_positions_lps) != n:
            raise ValueError(f"{len(slice_positions_lps)} slice positions for {n} slices")
        positions = [[float(v) for v in p] for p in slice_positions_lps]
    seed = uid_seed or f"{patient_id}/{series_description}/{series_number}"
    uids = {
        "study": study_uid or generate_uid(entropy_srcs=[seed, "study"]),
        "series": generate_uid(entropy_srcs=[seed, "series"]),
        "frame": frame_of_reference_uid or generate_uid(entropy_srcs=[seed, "frame"]),
    }
    common = {
        "series_description": series_description, "series_number": series_number, "patient_id": patient_id,
        "orientation": orientation, "spacing": spacing,
        "thickness": slice_thickness_mm if slice_thickness_mm is not None else step,
        "tilt": gantry_tilt_deg, "slope": rescale_slope, "intercept": rescale_intercept, "kernel": kernel,
    }
    ds = _series_dataset(stored.shape[1], stored.shape[0], uids, common)
    for key, value in (extra_tags or {}).items():
        setattr(ds, key, value)
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    shared = {tag: _encode(ds[tag]) for tag in ds.keys() if tag not in _PER_SLICE}
    paths = []
    with atomic_dir(out_dir) as tmp:
        for k in range(n):
            sop_uid = generate_uid(entropy_srcs=[seed, str(k)])
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            per_slice = {
                0x00080018: DataElement(0x00080018, "UI", sop_uid),
                0x00200013: DataElement(0x00200013, "IS", k + 1),
                0x00200032: DataElement(0x00200032, "DS", [_ds(v) for v in positions[k]]),
                0x00201041: DataElement(0x00201041, "DS", _ds(float(np.dot(normal, np.asarray(positions[k], float))))),
                0x7FE00010: DataElement(0x7FE00010, "OW", np.ascontiguousarray(stored[:, :, k].T, dtype="<i2").tobytes()),
            }
            body = {**shared, **{t: _encode(e) for t, e in per_slice.items()}}
            name = f"IM{k + 1:04d}.dcm"
            with open(tmp / name, "wb") as fh:
                fh.write(_file_header(ds.file_meta))
                fh.write(b"".join(body[t] for t in sorted(body)))
            paths.append(Path(out_dir) / name)
    return paths


# Slice-specific elements; every other element is encoded once per series (pydicom's per-element
# encoder is the slow part of writing a few thousand small files, so the bytes are reused).
_PER_SLICE = frozenset({0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010})


def _encode(elem: DataElement) -> bytes:
    """One data element as pydicom encodes it in Explicit VR Little Endian."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem)
    return fp.getvalue()


def _file_header(meta: FileMetaDataset) -> bytes:
    """Preamble, 'DICM' prefix and File Meta Information group (as ``dcmwrite`` writes them)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue()


def _series_dataset(rows: int, columns: int, uids: dict[str, str], c: dict[str, Any]) -> FileDataset:
    """Every tag shared by the slices of the series; per-slice tags are set by the caller."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.StudyTime = ds.AccessionNumber = ds.ReferringPhysicianName = ""
    ds.Modality, ds.Manufacturer = "CT", "HemExp synthetic phantom"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "", c["patient_id"], "", ""
    ds.PatientIdentityRemoved, ds.DeidentificationMethod = "YES", "synthetic phantom: no personal data"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids["study"], uids["series"], uids["frame"]
    ds.StudyID, ds.SeriesNumber = "", c["series_number"]
    ds.SeriesDescription = c["series_description"]
    ds.PositionReferenceIndicator = ""
    ds.SliceThickness = _ds(c["thickness"])
    ds.KVP, ds.ConvolutionKernel, ds.GantryDetectorTilt = "120", c["kernel"], _ds(c["tilt"])
    ds.PatientPosition = "HFS"
    ds.ImageOrientationPatient = [_ds(v) for v in c["orientation"]]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.PixelSpacing = [_ds(v) for v in c["spacing"]]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _ds(c["intercept"]), _ds(c["slope"]), "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "80"
    ds.BurnedInAnnotation = "NO"
    return ds
